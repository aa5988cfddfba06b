"""Measure cache.py against a real Redis, through its public API only.

Each target figure but one is a ratio to its floor, the least any cache could do for the same job, measured in
the same run in alternating rounds (medians), so that both see the same machine noise; the other is the Redis
server time a hit costs, from INFO commandstats. The rest show that the cache still does its job: one model call
for a crowd, a stream or a thousand tasks; waiters answered soon after the store; failing open.

    python bench.py            # starts its own redis-server on a free port (or uses REDIS_URL); a few minutes
    python bench.py --quick    # a short run for CI: fewer rounds, processes and seconds
    python bench.py --json     # the same figures as JSON

The exit code is 0 whether the targets are met or not: CI runs this so that it cannot rot, not to judge it.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import redis
import redis.asyncio
import redis.utils

import cache

MODEL = "gpt-4.1-mini"
TTL = 600  # given to every call, so that the floors can SET with the same expiry
MSGS = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Summarise the plot of Hamlet in three sentences."}]
COMPLETION = {  # a realistic ~1 KB chat completion
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_760_000_000, "model": MODEL,
    "system_fingerprint": "fp_bench", "service_tier": "default",
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": {
        "role": "assistant", "refusal": None, "annotations": [],
        "content": "Prince Hamlet learns from his father's ghost that his uncle Claudius murdered the king to take the "
                   "throne and marry Queen Gertrude. Feigning madness, Hamlet wavers over revenge, stages a play "
                   "that exposes Claudius's guilt, and mistakenly kills Polonius, which drives Ophelia to madness "
                   "and death. In a final duel arranged by Claudius, poisoned blade and cup kill Gertrude, Laertes, "
                   "Claudius and Hamlet, leaving Fortinbras to take the crown of Denmark."}}],
    "usage": {"prompt_tokens": 31, "completion_tokens": 104, "total_tokens": 135,
              "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}}
DATA = json.dumps(COMPLETION, separators=(",", ":"))  # what the floors store and read
KEYS = 100  # cached requests the throughput workers cycle through
QUESTIONS = [[{"role": "user", "content": f"throughput question {i}"}] for i in range(KEYS)]
# figure: (comparison, bound); the server figure is in µs, the rest ratios
TARGETS = {"hit": ("<=", 1.30), "server": ("<=", 5.0), "async_hit": ("<=", 1.25), "miss": ("<=", 1.50),
           "throughput": (">=", 0.75), "sdk": ("<=", 1.30)}
FORK = multiprocessing.get_context("fork")  # the workers inherit cache.PREFIX and settings, and start fast


class Mode(NamedTuple):
    rounds: int  # alternating rounds of each ratio figure
    hits: int  # calls per round of the hit figures
    misses: int  # calls per round of the miss figure
    seconds: float  # length of one throughput run
    runs: int  # throughput runs of each kind
    crowd: int  # processes asking one request
    call: float  # seconds the model call takes in the crowd and the tasks figures
    followers: int  # processes following one stream
    chunks: int  # chunks in that stream
    killed_holder: bool  # it waits out LOCK_TTL: full mode only


QUICK = Mode(rounds=7, hits=2000, misses=300, seconds=1.5, runs=2, crowd=6, call=0.5, followers=4, chunks=10,
             killed_holder=False)
FULL = Mode(rounds=9, hits=10000, misses=2000, seconds=5.0, runs=3, crowd=16, call=1.0, followers=16, chunks=40,
            killed_holder=True)


class Model:
    """A stand-in for the model call: answers at once, and counts its calls so that a hit can be told from a miss."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict:
        self.calls += 1
        return COMPLETION


class Server(NamedTuple):
    url: str
    proc: subprocess.Popen | None = None  # None: REDIS_URL's Redis, not ours to freeze
    port: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, int]:
    port, workdir = free_port(), tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    for _ in range(200):
        try:
            redis.Redis(port=port).ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.025)
    raise RuntimeError("redis-server did not start")


@contextlib.contextmanager
def redis_server() -> Iterator[Server]:
    """REDIS_URL's Redis if it is set, else a redis-server of our own on a free port, killed at the end."""
    given = os.environ.pop("REDIS_URL", None)  # popped: the module's own client is used only by fail_open
    if given:
        yield Server(given)
        return
    if not shutil.which("redis-server"):
        raise SystemExit("bench.py needs redis-server on PATH, or REDIS_URL")
    proc, port = start_server()
    try:
        yield Server(f"redis://127.0.0.1:{port}/0", proc, port)
    finally:
        proc.kill()
        proc.wait()


def fresh_prefix(figure: str) -> None:
    """Each figure under its own PREFIX, so that none sees another's entries or stats."""
    cache.PREFIX = f"bench:{uuid.uuid4().hex[:12]}:{figure}:"


SORTED = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode  # built once: dumps builds one a call


def sha256_key(messages: list, model: str) -> str:
    """The least a cache keyed by the SHA-256 of the canonical request must do before its GET."""
    return cache.PREFIX + hashlib.sha256(SORTED([model, messages]).encode()).hexdigest()


def judged(figure: str, value: float) -> dict:
    op, bound = TARGETS[figure]
    return {"target": f"{op} {bound:.2f}", "met": value <= bound if op == "<=" else value >= bound}


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


async def aper_call_us(fn: Callable[[], Any], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - t) / n * 1e6


def in_rounds(rounds: int, n: int, loops: list[Callable[[], Any]], after: Callable[[], Any] = lambda: None) -> list:
    """Times n calls of each loop in turn, round after round: each loop's µs per call in each round. after()
    runs, untimed, after each loop's turn."""
    times: list[list[float]] = [[] for _ in loops]
    for _ in range(rounds):
        for row, fn in zip(times, loops, strict=True):
            row.append(per_call_us(fn, n))
            after()
    return times


def versus(floor: list[float], times: list[float]) -> dict:
    """The medians, and the median of each round's ratio (a round's noise hits both sides)."""
    return {"floor_us": statistics.median(floor), "us": statistics.median(times), "rounds": len(times),
            "ratio": statistics.median(t / f for t, f in zip(times, floor, strict=True))}


def sync_hit(url: str, mode: Mode) -> dict:
    """get_or_set on a cached 1 KB completion vs GET + json.loads of the same JSON, on the same client."""
    fresh_prefix("hit")
    r, model = redis.Redis.from_url(url), Model()
    floor_key, keyed_key = cache.PREFIX + "floor", sha256_key(MSGS, MODEL)
    r.set(floor_key, DATA, ex=TTL)
    r.set(keyed_key, DATA, ex=TTL)
    cache.get_or_set(MSGS, MODEL, model, TTL, client=r)  # the one miss: the entry every hit reads
    get = r.execute_command
    floor, keyed, hits = in_rounds(mode.rounds, mode.hits, [
        lambda: json.loads(get("GET", floor_key)),
        lambda: json.loads(get("GET", sha256_key(MSGS, MODEL))),
        lambda: cache.get_or_set(MSGS, MODEL, model, TTL, client=r)])
    cache.stats(client=r)  # hits counted locally are flushed now, not during the next figure
    r.delete(floor_key, keyed_key)
    figure = versus(floor, hits)
    return {**figure, "keyed": versus(floor, keyed), "misses": model.calls - 1, **judged("hit", figure["ratio"])}


# Commands whose usec includes the commands they run; Redis counts those again, each on its own row.
CONTAINERS = {f"cmdstat_{name}" for name in ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro", "exec")}


class Spent(NamedTuple):
    """From INFO commandstats: calls and usec of all rows, usec of the CONTAINERS rows, calls and usec of GET."""

    calls: int
    us: int
    container_us: int
    get_calls: int
    get_us: int

    def __sub__(self, other: tuple) -> Spent:
        return Spent(*(a - b for a, b in zip(self, other, strict=True)))


def commandstats(r: redis.Redis) -> Spent:
    """Counts so far: snapshots to diff, never CONFIG RESETSTAT, as REDIS_URL may be a shared server."""
    rows = r.info("commandstats")
    get = rows.get("cmdstat_get", {"calls": 0, "usec": 0})
    return Spent(sum(row["calls"] for row in rows.values()), sum(row["usec"] for row in rows.values()),
                 sum(row["usec"] for name, row in rows.items() if name in CONTAINERS), get["calls"], get["usec"])


def server_spent(r: redis.Redis, work: Callable[[], Any]) -> Spent:
    """What commandstats counted while work() ran (and the first snapshot's INFO, counted when it ended)."""
    before = commandstats(r)
    work()
    return commandstats(r) - before


def server_time(url: str, mode: Mode) -> dict:
    """Redis server µs per hit, amortized over n hits and the stats() call that flushes their counts, less what a
    stats() call with nothing to flush costs (and the INFO snapshots, the same in both). The sum of every row
    counts a script's inner commands twice (in the script's usec and on their own rows): the target is judged
    on it, an upper bound; at_least_us is the sum's lower bound, max(scripts' time, every other row's)."""
    fresh_prefix("server")
    r, n, model = redis.Redis.from_url(url), mode.hits, Model()
    cache.get_or_set(MSGS, MODEL, model, TTL, client=r)
    floor_key = cache.PREFIX + "floor"
    r.set(floor_key, DATA, ex=TTL)
    cache.stats(client=r)  # so that no earlier hit is flushed in a measured window

    def hits() -> None:
        for _ in range(n):
            cache.get_or_set(MSGS, MODEL, model, TTL, client=r)
        cache.stats(client=r)

    rounds = []
    for _ in range(mode.rounds):
        alone = server_spent(r, lambda: cache.stats(client=r))
        spent = server_spent(r, hits) - alone
        gets = server_spent(r, lambda: [r.execute_command("GET", floor_key) for _ in range(n)])
        rounds.append((spent.us / n, max(spent.container_us, spent.us - spent.container_us) / n, spent.calls / n,
                       gets.get_us / gets.get_calls))
    r.delete(floor_key)
    us, at_least, commands, get = (statistics.median(column) for column in zip(*rounds, strict=True))
    return {"us_per_hit": us, "at_least_us": at_least, "commands_per_hit": commands, "us_per_get": get,
            "rounds": mode.rounds, **judged("server", us)}


def async_hit(url: str, mode: Mode) -> dict:
    """aget_or_set on a cached 1 KB completion vs await GET + json.loads, on the same redis.asyncio client."""
    fresh_prefix("async")

    async def run() -> dict:
        r, model, key = redis.asyncio.Redis.from_url(url), Model(), cache.PREFIX + "floor"
        await r.set(key, DATA, ex=TTL)
        await cache.aget_or_set(MSGS, MODEL, model, TTL, client=r)

        async def floor() -> Any:
            return json.loads(await r.get(key))

        floors, hits = [], []
        for _ in range(mode.rounds):
            floors.append(await aper_call_us(floor, mode.hits))
            hits.append(await aper_call_us(lambda: cache.aget_or_set(MSGS, MODEL, model, TTL, client=r), mode.hits))
        await cache.astats(client=r)
        await r.delete(key)
        await r.aclose()
        return {**versus(floors, hits), "misses": model.calls - 1}

    figure = asyncio.run(run())
    return {**figure, **judged("async_hit", figure["ratio"])}


def miss(url: str, mode: Mode) -> dict:
    """get_or_set on a new request each time, with a call_fn that answers at once: the caller's wait, vs a GET
    that finds nothing and a SET EX of the same JSON. stats() after each round, untimed, so that work the cache
    left to a background thread ends before the next round."""
    fresh_prefix("miss")
    r, model, total = redis.Redis.from_url(url), Model(), mode.rounds * mode.misses + 1
    questions = iter([[{"role": "user", "content": f"miss {i}"}] for i in range(total)])
    keys = iter([f"{cache.PREFIX}floor:{i}" for i in range(2 * total)])
    get = r.execute_command

    def floor() -> None:
        key = next(keys)
        get("GET", key)
        get("SET", key, DATA, "EX", TTL)

    def three_trips() -> None:  # a single flight's least: look, lock, store (its release would be a fourth)
        key = next(keys)
        get("GET", key)
        get("SET", key + ":lock", "token", "NX", "PX", 10_000)
        get("SET", key, DATA, "EX", TTL)

    def a_miss() -> None:
        cache.get_or_set(next(questions), MODEL, model, TTL, client=r)

    floor()  # the connection and the cache's scripts, ready before the first round
    a_miss()
    floors, trips, misses = in_rounds(mode.rounds, mode.misses, [floor, three_trips, a_miss],
                                      after=lambda: cache.stats(client=r))
    figure = versus(floors, misses)
    return {**figure, "trips": versus(floors, trips), "hits": total - model.calls, **judged("miss", figure["ratio"])}


def sdk_hit(url: str, mode: Mode) -> dict:
    """openai's client.chat.completions.create answered by the cache (a hit) vs answered at once by an
    httpx2.MockTransport with the same bytes, which is the SDK's own cost: the difference is what the cache adds,
    judged against the floor (GET + json.loads) of the same rounds."""
    import httpx2
    import openai

    fresh_prefix("sdk")
    r, body = redis.Redis.from_url(url), DATA.encode()
    answer = httpx2.MockTransport(lambda request: httpx2.Response(200, content=body,
                                                                  headers={"content-type": "application/json"}))

    def sdk(transport: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url="http://llm.test/v1", api_key="sk-bench", max_retries=0,
                             http_client=httpx2.Client(transport=transport))

    floor_key = cache.PREFIX + "floor"
    get = r.execute_command

    def one_get(request: Any) -> Any:  # the least a cache under the SDK does: one round trip, then the answer
        get("GET", floor_key)
        return answer.handle_request(request)

    mocked, cached, getting = sdk(answer), sdk(cache.Transport(answer, client=r)), sdk(httpx2.MockTransport(one_get))
    r.set(floor_key, DATA, ex=TTL)
    cached.chat.completions.create(model=MODEL, messages=MSGS)  # the one miss: the entry every hit reads
    floor, sdk_alone, sdk_cached, sdk_get = in_rounds(mode.rounds, mode.hits // 4, [
        lambda: json.loads(get("GET", floor_key)),
        lambda: mocked.chat.completions.create(model=MODEL, messages=MSGS),
        lambda: cached.chat.completions.create(model=MODEL, messages=MSGS),
        lambda: getting.chat.completions.create(model=MODEL, messages=MSGS)])
    cache.stats(client=r)
    r.delete(floor_key)
    added = [c - a for c, a in zip(sdk_cached, sdk_alone, strict=True)]
    get_added = [g - a for g, a in zip(sdk_get, sdk_alone, strict=True)]
    figure = {**versus(floor, added), "sdk_us": statistics.median(sdk_alone),
              "cached_us": statistics.median(sdk_cached), "get": versus(floor, get_added)}
    return {**figure, **judged("sdk", figure["ratio"])}


def _hammer(url: str, kind: str, seconds: float, threads: int, ready: Any, start: Any, done: Any) -> None:
    """A worker process: its threads read the KEYS cached requests in turn, through one client, for seconds."""
    r, model = redis.Redis.from_url(url), Model()
    r.ping()
    floor_keys, counts = [f"{cache.PREFIX}floor:{i}" for i in range(KEYS)], []

    def read(i: int) -> Any:
        if kind == "floor":
            return json.loads(r.execute_command("GET", floor_keys[i]))
        return cache.get_or_set(QUESTIONS[i], MODEL, model, TTL, client=r)

    def loop(i: int) -> None:
        start.wait()
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            read((i + n) % KEYS)
            n += 1
        counts.append(n)

    workers = [threading.Thread(target=loop, args=(i * 13,)) for i in range(threads)]
    for w in workers:
        w.start()
    ready.wait()
    for w in workers:
        w.join()
    with done.get_lock():
        done.value += sum(counts)


def hammer_run(url: str, kind: str, seconds: float, processes: int = 4, threads: int = 8) -> float:
    """Reads per second of processes x threads, all started at once once every process has connected."""
    ready, start, done = FORK.Barrier(processes + 1), FORK.Event(), FORK.Value("q", 0)
    procs = [FORK.Process(target=_hammer, args=(url, kind, seconds, threads, ready, start, done))
             for _ in range(processes)]
    for p in procs:
        p.start()
    ready.wait(timeout=60)
    start.set()
    for p in procs:
        p.join()
    return done.value / seconds


def throughput(url: str, mode: Mode) -> dict:
    """Hits per second of 4 processes x 8 threads on 100 cached requests, vs the same with GET + json.loads."""
    fresh_prefix("throughput")
    r = redis.Redis.from_url(url)
    for i, question in enumerate(QUESTIONS):
        r.set(f"{cache.PREFIX}floor:{i}", DATA, ex=TTL)
        cache.get_or_set(question, MODEL, Model(), TTL, client=r)
    cache.stats(client=r)  # flushed before forking, so that no child inherits counts to flush
    floors, hits = [], []
    for _ in range(mode.runs):
        floors.append(hammer_run(url, "floor", mode.seconds))
        hits.append(hammer_run(url, "cache", mode.seconds))
    ratio = statistics.median(h / f for h, f in zip(hits, floors, strict=True))
    return {"floor_per_s": statistics.median(floors), "per_s": statistics.median(hits), "runs": mode.runs,
            "seconds": mode.seconds, "ratio": ratio, **judged("throughput", ratio)}


def _released_together(workers: list[tuple]) -> list:
    """A process per (target, *args), each started and connected, then all released at once by an Event; what
    each put in the queue (target takes its args, then the Event and the queue)."""
    start, out = FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=target, args=(*args, start, out)) for target, *args in workers]
    for p in procs:
        p.start()
    time.sleep(0.5)  # let every process connect first
    start.set()
    rows = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    return rows


def _crowd_member(url, delay, call, done, start, out):
    r, own = redis.Redis.from_url(url), redis.Redis.from_url(url)  # own: the call's commands, apart from the cache's
    r.ping()

    def call_fn() -> dict:
        own.incr(cache.PREFIX + "calls")
        time.sleep(call)
        own.set(cache.PREFIX + "answered", time.monotonic())  # get_or_set stores the answer right after
        return COMPLETION

    start.wait()
    time.sleep(delay)
    cache.get_or_set(MSGS, MODEL, call_fn, TTL, client=r)
    ended = time.monotonic()
    done.wait()  # report once every member has its answer, so that reporting slows no one down
    out.put((delay, ended))


def crowd(url: str, mode: Mode) -> dict:
    """One process leads (its call takes mode.call s); the others ask the same request at random moments while it
    runs. A waiter's lag runs from the leader's call_fn returning (the store follows) to its own return; the
    monotonic clock is system-wide."""
    fresh_prefix("crowd")
    delays = [0.0] + [random.uniform(0.05, mode.call * 0.8) for _ in range(mode.crowd - 1)]
    done = FORK.Barrier(mode.crowd)
    rows = _released_together([(_crowd_member, url, d, mode.call, done) for d in delays])
    r = redis.Redis.from_url(url)
    answered = float(r.get(cache.PREFIX + "answered"))
    lags = [(ended - answered) * 1000 for delay, ended in rows if delay > 0]
    return {"processes": mode.crowd, "call_s": mode.call, "calls": int(r.get(cache.PREFIX + "calls")),
            "lag_median_ms": statistics.median(lags), "lag_max_ms": max(lags)}


def _streamer(url, chunks, gap, start, out):
    r = redis.Redis.from_url(url)
    r.ping()
    sent: list[float] = []  # when the model sent each chunk, if this process called it

    def model() -> Iterator[dict]:
        r.incr(cache.PREFIX + "calls")
        for i in range(chunks):
            time.sleep(gap)  # the model sends a chunk every gap s
            sent.append(time.monotonic())
            yield {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                   "choices": [{"index": 0, "delta": {"content": f"word{i} "},
                                "finish_reason": "stop" if i == chunks - 1 else None}]}

    start.wait()
    times, got = [], []
    for chunk in cache.get_or_set(MSGS, MODEL, model, TTL, client=r):
        times.append(time.monotonic())
        got.append(chunk)
    out.put({"times": times, "sent": sent, "chunks": json.dumps(got)})


def stream(url: str, mode: Mode, gap: float = 0.025) -> dict:
    """followers + 1 processes ask for one streamed answer at once: one leads, the others follow it live. A chunk's
    lag is from the model sending it (to the leader) to a follower getting it."""
    fresh_prefix("stream")
    rows = _released_together([(_streamer, url, mode.chunks, gap)] * (mode.followers + 1))
    leader = next(row for row in rows if row["sent"])
    rest = [row for row in rows if row is not leader]
    lags = [(got - sent) * 1000 for row in rest for got, sent in zip(row["times"], leader["sent"], strict=False)]
    return {"followers": len(rest), "chunks": mode.chunks, "gap_s": gap,
            "calls": int(redis.Redis.from_url(url).get(cache.PREFIX + "calls")),
            "identical": all(row["chunks"] == leader["chunks"] for row in rest),
            "lag_median_ms": statistics.median(lags), "lag_max_ms": max(lags)}


def _longest_gap(ticks: list[float], start: float, end: float) -> float:
    """The longest the loop went without running the ticker, between start and end, in ms."""
    inside = [start] + [t for t in ticks if start < t < end] + [end]
    return max(b - a for a, b in zip(inside, inside[1:], strict=False)) * 1000


def tasks(url: str, mode: Mode, count: int = 1000) -> dict:
    """count tasks of one loop ask for one request while another worker calls the model for it (mode.call s)."""
    fresh_prefix("tasks")
    question, calls, stored = [{"role": "user", "content": "tasks"}], [], []

    def other_worker() -> None:  # its own client, so that nothing is shared with the tasks but Redis
        def call_fn() -> dict:
            calls.append(1)
            time.sleep(mode.call)
            stored.append(time.perf_counter())  # the store follows at once
            return COMPLETION
        cache.get_or_set(question, MODEL, call_fn, TTL, client=redis.Redis.from_url(url))

    async def run() -> dict:
        r, ticks, done = redis.asyncio.Redis.from_url(url), [], []

        async def ticker() -> None:  # runs every ms the loop lets it
            while len(done) < count:
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.001)

        async def ask() -> None:
            await cache.aget_or_set(question, MODEL, lambda: calls.append(1) or COMPLETION, TTL, client=r)
            done.append(time.perf_counter())

        holder = threading.Thread(target=other_worker)
        holder.start()
        while not calls:
            await asyncio.sleep(0.001)
        tick, began = asyncio.ensure_future(ticker()), time.perf_counter()
        await asyncio.gather(*(ask() for _ in range(count)))
        await tick
        holder.join()
        await r.aclose()
        lags = [(d - stored[0]) * 1000 for d in done]
        return {"tasks": count, "call_s": mode.call, "calls": len(calls), "lag_median_ms": statistics.median(lags),
                "lag_max_ms": max(lags), "stall_waiting_ms": _longest_gap(ticks, began + 0.1, stored[0])}
    return asyncio.run(run())


def _holder(url, start):
    r = redis.Redis.from_url(url)

    def call_fn() -> None:
        r.set(cache.PREFIX + "holding", time.monotonic())
        time.sleep(3600)

    start.wait()
    cache.get_or_set(MSGS, MODEL, call_fn, TTL, client=r)


def _late_waiter(url, call, start, out):
    r = redis.Redis.from_url(url)
    start.wait()
    cache.get_or_set(MSGS, MODEL, lambda: (time.sleep(call), COMPLETION)[1], TTL, client=r)
    out.put(time.monotonic())


def killed_holder(url: str, mode: Mode, call: float = 0.2, waiters: int = 8) -> dict:
    """The lock holder is SIGKILLed inside its call, after renewing its lock: when do the waiters get an answer?"""
    fresh_prefix("killed")
    r, start, out = redis.Redis.from_url(url), FORK.Event(), FORK.Queue()
    holder = FORK.Process(target=_holder, args=(url, start))
    holder.start()
    procs = [FORK.Process(target=_late_waiter, args=(url, call, start, out)) for _ in range(waiters)]
    start.set()
    while r.get(cache.PREFIX + "holding") is None:
        time.sleep(0.001)
    for p in procs:
        p.start()
    time.sleep(cache.LOCK_TTL / 2)  # killed at a random point of its renewal cycle, not right after taking the lock
    holder.kill()
    killed = time.monotonic()
    answered = [out.get(timeout=cache.LOCK_TTL + 60) for _ in procs]
    for p in procs:
        p.join()
    return {"lock_ttl_s": cache.LOCK_TTL, "call_s": call, "waiters": waiters,
            "last_answer_after_kill_s": max(answered) - killed, "bound_s": cache.LOCK_TTL + call + 0.5}


def outage(url: str, path: str, calls: int) -> dict:
    """calls calls on new requests through the module's own client (REDIS_URL, its short timeouts)."""
    os.environ["REDIS_URL"] = url
    times = asyncio.run(_outage_async(calls)) if path == "async" else []
    for i in range(calls if path == "sync" else 0):
        t = time.perf_counter()
        cache.get_or_set([{"role": "user", "content": f"sync {i}"}], MODEL, lambda: "answer")
        times.append(time.perf_counter() - t)
    os.environ.pop("REDIS_URL")
    return {"calls": calls, "first_call_ms": times[0] * 1000, "total_ms": sum(times) * 1000,
            "median_call_us": statistics.median(times) * 1e6}


async def _outage_async(calls: int) -> list[float]:
    times = []
    for i in range(calls):
        t = time.perf_counter()
        await cache.aget_or_set([{"role": "user", "content": f"async {i}"}], MODEL, lambda: "answer")
        times.append(time.perf_counter() - t)
    return times


def fail_open(server: Server, calls: int = 100) -> dict:
    """What get_or_set and aget_or_set cost while Redis refuses connections, then while it is frozen (SIGSTOP, our
    own server only). Each path goes to a URL of its own, so that each meets the outage afresh."""
    result = {f"refused ({path})": outage(f"redis://127.0.0.1:{free_port()}/0", path, calls)
              for path in ("sync", "async")}
    if server.proc is None:
        return result
    server.proc.send_signal(signal.SIGSTOP)
    try:
        for db, path in enumerate(("sync", "async"), start=1):
            result[f"frozen ({path})"] = outage(f"redis://127.0.0.1:{server.port}/{db}", path, calls)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    return result


def verdict(figure: dict, unit: str = "x") -> str:
    return f"(target {figure['target']}{unit}: {'met' if figure['met'] else 'NOT met'})"


def ratio_line(label: str, f: dict, note: str = "") -> str:
    return f"{label:<32} {f['us']:8.1f} us   {f['ratio']:.2f}x the floor   {note or verdict(f)}"


def show_hit(f: dict) -> list[str]:
    return [f"{'floor: GET + json.loads':<32} {f['floor_us']:8.1f} us",
            ratio_line("  + sha256 of the request", f["keyed"], "(reference)"),
            ratio_line("hit (get_or_set)", f) + (f"   {f['misses']} hits missed!" if f["misses"] else "")]


def show_server(f: dict) -> list[str]:
    scripts = "" if f["at_least_us"] == f["us_per_hit"] else (
        f"; at least {f['at_least_us']:.1f} us, as Redis counts a script's commands twice")
    return [f"{'Redis server time per hit':<32} {f['us_per_hit']:8.1f} us   {verdict(f, ' us')}   incl. the flushes, "
            f"{f['commands_per_hit']:.2f} commands a hit{scripts}; a GET: {f['us_per_get']:.1f} us"]


def show_async(f: dict) -> list[str]:
    return [f"{'async floor: await GET + loads':<32} {f['floor_us']:8.1f} us",
            ratio_line("async hit (aget_or_set)", f) + (f"   {f['misses']} hits missed!" if f["misses"] else "")]


def show_miss(f: dict) -> list[str]:
    return [f"{'floor: GET nothing + SET EX':<32} {f['floor_us']:8.1f} us",
            ratio_line("  + SET NX PX (a lock) between", f["trips"], "(reference)"),
            ratio_line("miss, caller's wait", f) + (f"   {f['hits']} misses hit!" if f["hits"] else "")]


def show_throughput(f: dict) -> list[str]:
    return [f"{'hit throughput, 4 x 8 threads':<32} {f['per_s']:8,.0f}/s   {f['ratio']:.2f}x the floor "
            f"({f['floor_per_s']:,.0f}/s)   {verdict(f)}"]


def show_sdk(f: dict) -> list[str]:
    return [f"{'openai create, MockTransport':<32} {f['sdk_us']:8.1f} us   (the SDK's own cost)",
            f"{'openai create, cache hit':<32} {f['cached_us']:8.1f} us",
            ratio_line("  what the cache adds", f),
            ratio_line("  what one GET adds there", f["get"],
                       "(reference: a transport that does one GET, then answers)")]


def show_crowd(f: dict) -> list[str]:
    return [f"{f['processes']} processes, one request, {f['call_s']:g} s call: {f['calls']} call(s); waiters return "
            f"{f['lag_median_ms']:.1f} ms (median), {f['lag_max_ms']:.1f} ms (max) after call_fn returned"]


def show_stream(f: dict) -> list[str]:
    return [f"{f['followers'] + 1} processes, one stream of {f['chunks']} chunks {f['gap_s'] * 1000:g} ms apart: "
            f"{f['calls']} call(s), chunks identical: {f['identical']}; a chunk reaches the followers "
            f"{f['lag_median_ms']:.1f} ms (median), {f['lag_max_ms']:.1f} ms (max) after the model sent it"]


def show_tasks(f: dict) -> list[str]:
    return [f"{f['tasks']} tasks of one loop, one request, another worker's {f['call_s']:g} s call: {f['calls']} "
            f"call(s); tasks return {f['lag_median_ms']:.1f} ms (median), {f['lag_max_ms']:.1f} ms (max) after "
            f"call_fn returned; the loop's longest stall while they wait {f['stall_waiting_ms']:.1f} ms"]


def show_killed(f: dict) -> list[str]:
    return [f"holder SIGKILLed in its call (LOCK_TTL {f['lock_ttl_s']:g} s): {f['waiters']} waiters answered "
            f"{f['last_answer_after_kill_s']:.2f} s after the kill (bound {f['bound_s']:.1f} s)"]


def show_fail_open(figure: dict) -> list[str]:
    return [f"Redis {name:16} {f['calls']} calls in {f['total_ms']:.0f} ms; first {f['first_call_ms']:.1f} ms, "
            f"median {f['median_call_us']:.0f} us" for name, f in figure.items()]


def summary(figures: dict) -> list[str]:
    rows = [("sync hit", "hit", "ratio", "x"), ("server time per hit", "server", "us_per_hit", " us"),
            ("async hit", "async_hit", "ratio", "x"), ("miss, caller's wait", "miss", "ratio", "x"),
            ("hit throughput", "throughput", "ratio", "x"), ("SDK hit, cache's part", "sdk", "ratio", "x")]
    lines = ["", f"{'figure':<22} {'value':>10}   {'target':<11} met"]
    for label, name, field, unit in rows:
        f = figures[name]
        lines.append(f"{label:<22} {f[field]:>7.2f}{unit:<3}   {f['target'] + unit:<11} {'yes' if f['met'] else 'NO'}")
    return lines


def figures_to_run(server: Server, mode: Mode) -> list[tuple[str, Callable[[], Any], Callable[[dict], list]]]:
    """(name, measure, show) for each figure, in the order they run; fail_open last, as it freezes the server."""
    url = server.url
    steps = [("hit", lambda: sync_hit(url, mode), show_hit), ("server", lambda: server_time(url, mode), show_server),
             ("async_hit", lambda: async_hit(url, mode), show_async), ("miss", lambda: miss(url, mode), show_miss),
             ("throughput", lambda: throughput(url, mode), show_throughput),
             ("sdk", lambda: sdk_hit(url, mode), show_sdk),
             ("crowd", lambda: crowd(url, mode), show_crowd), ("stream", lambda: stream(url, mode), show_stream),
             ("tasks", lambda: tasks(url, mode), show_tasks)]
    if mode.killed_holder:
        steps.append(("killed_holder", lambda: killed_holder(url, mode), show_killed))
    return [*steps, ("fail_open", lambda: fail_open(server), show_fail_open)]


def header(url: str) -> dict:
    return {"redis_server": redis.Redis.from_url(url).info("server")["redis_version"],
            "redis_py": redis.__version__, "hiredis": redis.utils.HIREDIS_AVAILABLE, "completion_bytes": len(DATA)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run, for CI")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    logging.getLogger("cache").setLevel(logging.ERROR)  # the fail-open runs warn by design
    with redis_server() as server:
        figures = {"header": header(server.url)}
        h = figures["header"]
        if not args.json:
            print(f"redis-server {h['redis_server']}, redis-py {h['redis_py']}, hiredis "
                  f"{'yes' if h['hiredis'] else 'no'}, a {h['completion_bytes']} B chat completion, "
                  f"{'quick' if args.quick else 'full'} mode")
        for name, measure, show in figures_to_run(server, mode):
            figures[name] = measure()
            if not args.json:
                print("\n".join(show(figures[name])), flush=True)
    print(json.dumps(figures, indent=2) if args.json else "\n".join(summary(figures)))


if __name__ == "__main__":
    main()
