"""Fixtures and helpers the test files share: redis-servers the tests start and stop, clients on every backend, an
event loop for sync test code, and one test body run on both get_or_set and aget_or_set."""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import multiprocessing
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid

import fakeredis
import pytest
import redis
import redis.asyncio
import tiktoken

import cache

MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"}]
ANSWER = {"choices": [{"message": {"role": "assistant", "content": "Paris."}}], "usage": {"total_tokens": 23}}
FORK = multiprocessing.get_context("fork")


# ---------------------------------------------------------------- real servers the tests own

def _need(reason: str) -> None:
    if os.environ.get("REQUIRE_REAL_REDIS") == "1":
        pytest.fail(f"REQUIRE_REAL_REDIS=1 but {reason}")
    pytest.skip(reason)


def _free_port(bus: bool = False) -> int:
    """A free port; with bus, one whose cluster bus port (port + 10000) is a free port too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus:
            return port
        if port + 10000 <= 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    pass


class Server:
    """A redis-server on a free port in its own directory, which a test may kill, freeze or restart."""

    def __init__(self, directory: pathlib.Path, *options: str):
        if shutil.which("redis-server") is None:
            _need("no redis-server on PATH")
        self.port, self.dir, self.options = _free_port(bus="--cluster-enabled" in options), directory, options
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir), *self.options],
                                     stdout=subprocess.DEVNULL)
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.025)
        self.kill()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def client(self, **kw) -> redis.Redis:
        return redis.Redis(port=self.port, **kw)

    def fill(self) -> list[socket.socket]:
        """Raw connections that take every client slot the server has left (maxclients); close them to free it."""
        held = []
        while True:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.sendall(b"PING\r\n")
            if not s.recv(64).startswith(b"+PONG"):  # "-ERR max number of clients reached"
                s.close()
                return held
            held.append(s)


@pytest.fixture(scope="session")
def real_url(tmp_path_factory):
    """TEST_REDIS_URL; else a redis-server from PATH; else a testcontainers Redis; else skip (or fail)."""
    if os.environ.get("TEST_REDIS_URL"):
        yield os.environ["TEST_REDIS_URL"]
        return
    if shutil.which("redis-server"):
        server = Server(tmp_path_factory.mktemp("redis"))
        yield server.url
        server.kill()
        return
    try:
        from testcontainers.redis import RedisContainer

        container = RedisContainer("redis:7").start()
    except Exception as e:  # no testcontainers, or no Docker engine answering
        _need(f"no real Redis: no TEST_REDIS_URL, no redis-server on PATH, no container ({e!r:.100})")
    yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
    container.stop()


@pytest.fixture
def server(tmp_path):
    """A server of this test's own, for faults no shared server may suffer."""
    s = Server(tmp_path)
    yield s
    s.thaw()
    s.kill()


@pytest.fixture(params=["fakeredis", "fakeredis-decoded", "real", "real-decoded"])
def client(request):
    decoded = request.param.endswith("decoded")
    if request.param.startswith("fakeredis"):
        c = fakeredis.FakeRedis(decode_responses=decoded)
    else:
        c = redis.Redis.from_url(request.getfixturevalue("real_url"), decode_responses=decoded)
    yield c
    c.close()


def twin(c):
    """Another client of the same server: a second worker, as far as the cache can tell (it coalesces per client)."""
    return redis.Redis(connection_pool=c.connection_pool)


def async_twin(c):
    """An asyncio client of the server that the sync client c talks to, with c's decoding and timeouts."""
    if isinstance(c, redis.RedisCluster):
        node = c.get_default_node()
        return redis.asyncio.RedisCluster(host=node.host, port=node.port)
    kw = c.connection_pool.connection_kwargs
    if c.connection_pool.connection_class.__module__.startswith("fakeredis"):
        return fakeredis.FakeAsyncRedis(host=kw["host"], port=kw["port"], decode_responses=kw["decode_responses"])
    names = ("host", "port", "db", "username", "password", "decode_responses", "socket_timeout",
             "socket_connect_timeout")
    retry = redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    return redis.asyncio.Redis(**{name: kw[name] for name in names if name in kw}, retry=retry)


@pytest.fixture(autouse=True)
def fresh_prefix(monkeypatch):
    """Every test writes under a prefix of its own, so no test flushes or sees another's keys."""
    monkeypatch.setattr(cache, "PREFIX", f"test:{uuid.uuid4().hex[:12]}:")


@pytest.fixture(autouse=True)
def no_counts_of_other_tests():
    """Hits that earlier tests counted, on clients of servers they may have stopped, are not sent in this one: the
    process's worker sends every client's counts, and would warn of a server that is gone in this test's log."""
    with cache._SYNC.lock, cache._counting:  # (the lock: a flush under way ends first)
        cache._SYNC.counts.clear()


# ---------------------------------------------------------------- tiktoken, without a download

def small_encoding(name, merges=()):
    """A tiktoken encoding built here: every byte a token, plus the given merges. No file, no download."""
    ranks = {bytes([b]): b for b in range(256)} | {m: 256 + i for i, m in enumerate(merges)}
    return tiktoken.Encoding(name, pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={})


BYTES = small_encoding("bytes")  # a token per byte
PAIRS = small_encoding("pairs", [bytes([a, b]) for a in range(97, 123) for b in range(97, 123)])  # and per two letters


@pytest.fixture(autouse=True)
def encodings(monkeypatch):
    """tiktoken's encodings at hand in every test, as small ones of the tests' own: no test loads or downloads one."""
    monkeypatch.setattr(cache, "_encodings", {"cl100k_base": BYTES, "o200k_base": PAIRS})
    monkeypatch.setattr(cache, "_loads", {})


# ---------------------------------------------------------------- both paths, one test body

class Loop:
    """An event loop in a thread of its own: sync test code awaits on it, from any number of threads."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout=60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self):
        self.run(self._finish())  # as asyncio.run ends: no task is left pending (and logged) when the loop closes
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    @staticmethod
    async def _finish():
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_asyncgens()


def _takes_no_arguments(fn) -> bool:
    try:
        inspect.signature(fn, follow_wrapped=False).bind()
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin, say): the call tells
        pass
    return True


@pytest.fixture(params=["sync", "async"])
def ask(request):
    """get_or_set; or aget_or_set with an awaitable call_fn, run on an event loop, and given the asyncio twin of
    the client passed: one test body for both paths. ask.stats is stats or astats the same way; ask.next,
    ask.read and ask.close take the next chunk of a stream, the rest of it, or close it; ask.sync tells the path."""
    if request.param == "sync":
        def ask(*args, **kw):
            return cache.get_or_set(*args, **kw)

        ask.stats, ask.next, ask.read, ask.close = cache.stats, next, list, lambda stream: stream.close()
        ask.sync = True
        yield ask
        return
    loop, twins = Loop(), {}

    def twin(client):
        return None if client is None else twins.setdefault(id(client), (client, async_twin(client)))[1]

    def ask(messages, model, call_fn, ttl=None, *, client=None, params=None):
        async def awaitable():
            return call_fn()

        wrapped = awaitable if callable(call_fn) and _takes_no_arguments(call_fn) else call_fn
        return loop.run(cache.aget_or_set(messages, model, wrapped, ttl, client=twin(client), params=params))

    async def read(stream):
        return [chunk async for chunk in stream]

    ask.stats = lambda client=None: loop.run(cache.astats(client=twin(client)))
    ask.next = lambda stream: loop.run(stream.__anext__())
    ask.read = lambda stream: loop.run(read(stream))
    ask.close = lambda stream: loop.run(stream.aclose())
    ask.sync = False
    yield ask
    loop.run(loop._finish())  # (the loop's worker sends what it has left while the clients are open)
    for _, c in twins.values():
        loop.run(c.aclose())
    loop.close()


@pytest.fixture
def ask_async_client(client):
    """An event loop, and the asyncio twin of client."""
    loop, aclient = Loop(), async_twin(client)
    yield loop, aclient
    loop.run(loop._finish())
    loop.run(aclient.aclose())
    loop.close()


# ---------------------------------------------------------------- callers and models

def counting(value=ANSWER):
    """A call_fn that returns value and records each call."""
    def call_fn():
        call_fn.calls += 1
        return value
    call_fn.calls = 0
    return call_fn


def elsewhere(fn):
    """fn(), called from another thread: a caller other than this thread."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result(timeout=60)


def _until(condition, timeout=30):
    """Wait for condition() to hold; fail the test, rather than hang it, if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _in_threads(n, fn):
    """Run fn in n threads released together; return what each returned or raised."""
    barrier, outcomes = threading.Barrier(n), []

    def run():
        barrier.wait(timeout=30)
        try:
            outcomes.append(fn())
        except Exception as e:
            outcomes.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return outcomes


def thread_with_ident(ident, target):
    """A started thread that runs target with the ident of a thread that has ended: idents are recycled (a new thread
    may get a dead one's stack), so start threads, each kept alive so the next can't get its stack, until one gets
    it. Skips if none does."""
    hold, others = threading.Event(), []
    try:
        for _ in range(200):
            t = threading.Thread(target=lambda: target() if threading.get_ident() == ident else hold.wait(60))
            t.start()
            if t.ident == ident:
                return t
            others.append(t)
            time.sleep(0.001)  # (the dead thread may still be on its way out)
    finally:
        hold.set()
        for t in others:
            t.join()
    pytest.skip("no new thread got the ident of the one that ended")
