"""Cache LLM calls in Redis: each distinct request calls the model once, for every worker of a fleet.

    out = get_or_set(messages, "gpt-4.1-mini", lambda: client.chat.completions.create(...).model_dump())
    out = await aget_or_set(messages, "gpt-4.1-mini", lambda: aclient.chat.completions.create(...))
    out = cached(client.chat.completions.create, model="gpt-4.1-mini", messages=messages)  # keyed on it all
"""
from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import queue
import reprlib
import secrets
import sys
import threading
import time
import types
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, NamedTuple

import redis
import redis.asyncio

# Durations are seconds, int or float. Every setting is read at call time: cache.HOT_TTL = 3600 applies next call.
PREFIX = os.environ.get("LLM_CACHE_PREFIX", "llm:v1:")  # bump it ("llm:v2:") to orphan every entry, no flush
DEFAULT_TTL = 24 * 3600  # an entry's lifetime unless it turns hot
HOT_THRESHOLD = 10  # hits within HOT_WINDOW that make an entry hot
HOT_WINDOW = 3600  # older hits don't count toward HOT_THRESHOLD
HOT_TTL = 6 * 3600  # each hit on a hot entry extends its life to this from now, never shortens it (0: never)
LOCK_TTL = 10  # how long a dead holder's lock blocks the others; a live holder renews it every LOCK_TTL / 3
MAX_WAIT = 900  # how long a waiter waits for a live holder before calling itself (the openai SDK gives up at 600)
STATS_TTL = 30 * 24 * 3600  # how long a stats shard outlives its last miss or window-opening hit (> HOT_WINDOW)
RETRY_AFTER = 5  # how long to leave a failed Redis alone: an outage costs one timeout, not one per call
REDIS_TIMEOUT = 0.5  # socket timeouts of the client made from REDIS_URL: the most a frozen Redis costs a call
DEFAULT_ENCODING = "cl100k_base"  # tiktoken's encoding for models it does not know
TRANSPORT_ONLY = ("timeout", "extra_headers")  # cached()'s keyword arguments that can't change the answer

log = logging.getLogger(__name__)


class StreamInterrupted(Exception):
    """A streamed answer broke off after some of its chunks were handed out, because the caller streaming it
    from the model failed or stopped. Nothing was stored: ask again for the whole answer."""


_MISS = object()  # a cached None, "" or [] is a hit
_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
_down_until: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> when to try it again
_warned_until: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> when to warn of its errors again
_flights: dict[tuple[int, Any, str], _Flight] = {}  # (client, threads or loop, entry) -> its caller leading it
_wait_slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pool -> waiters' connections it may still open
_loop_clients: dict[asyncio.AbstractEventLoop, dict] = {}  # event loop -> the clients made from REDIS_URL for it
_tasks: set[asyncio.Task] = set()  # background tasks, held until they end
_streaming: dict[tuple, int] = {}  # (entry, thread, or loop and task) -> how many streams of it that caller leads
_encodings: dict[str, Any] = {}  # tiktoken encoding name -> the encoding, once loaded
_loads: dict[str, float] = {}  # encoding name -> when its last load failed (inf while one runs)
_loading = threading.Lock()  # so that one thread starts a load, and one warns
_MAX_SECONDS = (2**63 - 1) // 1000 - 2**32  # Redis refuses expiries past 2**63 - 1 ms after 1970 (2**32 s to spare)
_MAX_TIMEOUT = int(threading.TIMEOUT_MAX)  # the longest timeout a lock, an event or a socket takes
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode  # built once


class _Flight:
    """One caller's way to an answer, through Redis and maybe the model; the process's other askers (threads, or
    tasks of its event loop) wait on it."""

    __slots__ = ("ended", "leader", "waiting", "counted", "data", "error", "traceback")

    def __init__(self, ended: threading.Lock | asyncio.Future, leader: object) -> None:
        self.ended, self.leader = ended, leader  # released, or done, when the leader has its answer or exception
        self.waiting: set[_Flight] = set()  # its followers; the leader counts those it answers as hits
        self.counted: set[_Flight] | frozenset = frozenset()  # the followers it counted, once it has its answer
        self.data: str | bytes | None = None  # the answer's JSON, if it may be shared
        self.error: Exception | None = None
        self.traceback: types.TracebackType | None = None

    def end(self) -> None:
        if isinstance(self.ended, asyncio.Future):
            self.ended.set_result(None)
        else:
            self.ended.release()


def _forget_flights() -> None:  # a forked child inherits the flights and loads, but not the threads that end them
    global _loading
    _loading = threading.Lock()
    registry: Any = sys.modules.get("tiktoken.registry")
    if registry is not None and math.inf in _loads.values():  # the parent's loading thread holds tiktoken's lock
        registry._lock = threading.RLock()
    _flights.clear()
    _streaming.clear()
    _wait_slots.clear()
    _loads.clear()
    _loop_clients.clear()  # the parent's loops and their connections are the parent's


os.register_at_fork(after_in_child=_forget_flights)


class _Settings(NamedTuple):  # in the units Redis takes, in the order _READ takes them
    lock_ms: int
    hot_threshold: int
    hot_ms: int
    window_ms: int
    stats_ms: int


@functools.lru_cache(maxsize=16, typed=True)  # checked once per combination: a hit stays cheap
def _settings(lock_ttl: Any, hot_threshold: Any, hot_ttl: Any, hot_window: Any, stats_ttl: Any, max_wait: Any,
              retry_after: Any) -> _Settings:
    if isinstance(hot_threshold, bool) or not isinstance(hot_threshold, int):
        raise TypeError(f"HOT_THRESHOLD must be a whole number of hits, got {type(hot_threshold).__name__}")
    if hot_threshold < 1:
        raise ValueError(f"HOT_THRESHOLD must be at least 1, got {hot_threshold}")
    _ms("MAX_WAIT", max_wait, least=0, most=_MAX_TIMEOUT)
    _ms("RETRY_AFTER", retry_after, least=0)
    # the renewals, every LOCK_TTL / 3, must outpace a busy machine: under 0.1 s they lost the lock in tests
    s = _Settings(_ms("LOCK_TTL", lock_ttl, least=0.1, most=_MAX_TIMEOUT), int(hot_threshold),
                  _ms("HOT_TTL", hot_ttl, least=0), _ms("HOT_WINDOW", hot_window), _ms("STATS_TTL", stats_ttl))
    if s.stats_ms <= s.window_ms:  # a shard's TTL is refreshed once a window
        raise ValueError(f"STATS_TTL must be longer than HOT_WINDOW, got {stats_ttl} and {hot_window}")
    return s


def _ms(name: str, seconds: Any, least: float = 0.001, most: float = _MAX_SECONDS) -> int:
    """seconds in the whole milliseconds Redis takes, or the error that says why they can't be."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(seconds).__name__}")
    if not least <= seconds <= most:  # also refuses nan
        raise ValueError(f"{name} must be from {least} to {most} seconds, got {seconds}")
    return math.ceil(seconds * 1000)


def _tag(hex2: str) -> str:
    # the hash tag that puts an entry, its lock, its stream and its stats shard in one Cluster slot
    return f"{PREFIX}{{{hex2}}}"


def _keys(messages: Any, model: Any, params: Any) -> list[str]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TypeError(f"messages must be a list of dicts, got {reprlib.repr(messages)}")
    if not isinstance(model, str):
        raise TypeError(f"model must be a non-empty str, got {type(model).__name__}")
    if not model:
        raise ValueError("model must be a non-empty str, got ''")
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"params must be a dict or None, got {type(params).__name__}")
    try:
        blob = _canonical([model, messages, params or {}])
    except (TypeError, ValueError) as e:
        raise TypeError(f"messages and params must be JSON-serializable: {e}") from None
    except RecursionError:
        raise ValueError("messages and params nest too deeply to be serialized") from None
    digest = hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()
    tag = _tag(digest[:2])
    return [tag + digest, tag + digest + ":lock", tag + digest + ":stored", tag + "stats"]


def _tokens(messages: list, model: str, value: Any) -> int:
    """What producing an answer cost: its usage.total_tokens, else tiktoken's count of prompt and answer."""
    try:
        if isinstance(value, _Stored):  # a stream's chunks: the last one's usage, else their deltas' text
            last = value[-1] if value and isinstance(value[-1], dict) else {}
            text = "".join(chunk for chunk in value if isinstance(chunk, str)) + "".join(
                (choice.get("delta") or {}).get("content") or "" for chunk in value if isinstance(chunk, dict)
                for choice in chunk.get("choices") or [])
            value = {"usage": last.get("usage"), "choices": [{"message": {"content": text}}]}
        usage = value.get("usage") if isinstance(value, dict) else None
        if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
            return usage["total_tokens"]
        if isinstance(value, dict) and "choices" in value:  # a chat completion: count its messages' text
            value = [(choice.get("message") or {}).get("content") for choice in value["choices"]]
        texts = [m.get("content") for m in messages] + (value if isinstance(value, list) else [value])
        encoding = _encoding(model)
        if encoding is None:
            return 0
        return sum(len(encoding.encode(t, disallowed_special=())) for t in texts if isinstance(t, str))
    except Exception as e:  # statistics must never fail a call
        log.warning("llm cache: counting 0 tokens for an answer of %r: %s: %.200s", model, type(e).__name__, e)
        return 0


def _encoding(model: str) -> Any:
    """tiktoken's encoding for model; None until a thread has loaded it: a download never holds up a call."""
    try:
        import tiktoken  # needed only for answers that carry no usage

        name = tiktoken.encoding_name_for_model(model)
    except (ImportError, KeyError):
        name = DEFAULT_ENCODING
    encoding = _encodings.get(name)
    if encoding is None:
        with _loading:  # one load at a time, a minute after the last failed; one warning per process
            due, first = _loads.get(name, -math.inf) < time.monotonic() - 60, not _loads
            if due:
                _loads[name] = math.inf
        if due and first:
            log.warning("llm cache: answers without usage count 0 tokens until tiktoken has loaded %s", name)
        if due and not _start(_load, name):
            _loads[name] = time.monotonic()
    return encoding


def _load(name: str) -> None:
    try:
        import tiktoken

        _encodings[name] = tiktoken.get_encoding(name)
    except Exception as e:  # not installed, or offline with no cached file
        log.info("llm cache: tiktoken could not load %s (%s: %.200s); trying again in a minute",
                 name, type(e).__name__, e)
        _loads[name] = time.monotonic()


def _redis(client: Any, sync: bool = True) -> Any:
    """The client to use; None if REDIS_URL names no Redis, which the calls treat as a Redis that is down."""
    if client is not None:
        if not _a_client(client.__class__, sync):
            kind = "redis.Redis or redis.RedisCluster" if sync else "redis.asyncio.Redis or redis.asyncio.RedisCluster"
            raise TypeError(f"client must be a {kind}, got {type(client).__name__}")
        return client
    url, timeout = os.environ.get("REDIS_URL", "redis://localhost:6379/0"), REDIS_TIMEOUT
    if sync:
        return _from_url(url, timeout)
    loop = asyncio.get_running_loop()  # an asyncio client serves one loop only
    for closed in [old for old in list(_loop_clients) if old.is_closed()]:  # they would hold their loop alive
        _loop_clients.pop(closed, None)
    made, key = _loop_clients.setdefault(loop, {}), (url, timeout, type(timeout))
    if key not in made:
        made[key] = _client(url, timeout, sync)
    return made[key]


@functools.cache  # isinstance with the pipeline classes costs 2 µs a call
def _a_client(cls: type, sync: bool) -> bool:
    module: Any = redis if sync else redis.asyncio
    pipelines = (module.client.Pipeline, module.cluster.ClusterPipeline)
    return issubclass(cls, (module.Redis, module.RedisCluster)) and not issubclass(cls, pipelines)


def _client(url: str, timeout: Any, sync: bool = True) -> Any:
    """A client for the URL, or None, with one error logged, if it is no Redis URL."""
    seconds = _ms("REDIS_TIMEOUT", timeout, most=_MAX_TIMEOUT) / 1000
    module: Any = redis if sync else redis.asyncio
    # A timeout is not retried (a frozen Redis costs one); a dropped connection is, once, so a restart is seamless.
    retry = module.retry.Retry(redis.backoff.NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    try:
        client = module.Redis.from_url(url, socket_timeout=seconds, socket_connect_timeout=seconds, retry=retry)
        for name in ("socket_timeout", "socket_connect_timeout"):  # the URL's own, if it has them
            _ms(f"REDIS_URL's {name}", client.connection_pool.connection_kwargs[name], most=_MAX_TIMEOUT)
        return client
    except (TypeError, ValueError) as e:  # "notaurl", or the "" of a blank line in .env
        log.error("llm cache: REDIS_URL is not a Redis URL (%s); every call goes to the model, uncached", e)
        return None


_from_url = functools.lru_cache(maxsize=16, typed=True)(_client)  # one sync client, or one error, per URL and timeout


def _failed(r: Any, error: Exception) -> None:
    now = time.monotonic()
    if isinstance(error, redis.ResponseError) or _exhausted(error):  # Redis is up (out of memory, say): not skipped
        if _warned_until.get(r, 0) < now:  # one warning per RETRY_AFTER, not one per call
            log.warning("llm cache: Redis refused (%s: %s); this call is not cached", type(error).__name__, error)
            _warned_until[r] = now + RETRY_AFTER
        return
    if r not in _down_until:  # once per outage, not once per call
        log.warning("llm cache: Redis failed (%s: %s); calling the model directly, retrying every %ss",
                    type(error).__name__, error, RETRY_AFTER)
    _down_until[r] = now + RETRY_AFTER


def _exhausted(error: Exception) -> bool:
    # a bounded pool with no connection free: this process is busy, Redis is fine (redis-py 5.0 raises a plain
    # ConnectionError, later ones MaxConnectionsError; BlockingConnectionPool's comes after its own timeout)
    return isinstance(error, redis.ConnectionError) and (type(error).__name__ == "MaxConnectionsError" or str(
        error) in ("Too many connections", "No connection available."))


class _Script:
    """A Lua script and the SHA-1 that EVALSHA names it by."""

    def __init__(self, source: bytes) -> None:
        self.source, self.sha = source, hashlib.sha1(source).hexdigest()


# KEYS: 1 entry hash {v = JSON, t = tokens it cost, w = when its hot window opened, n = its hits in it}, 2 its
# lock, 3 the stream its waiters block on, 4 its stats shard.  ARGV: 1 lock token ('' to count hits only), 2-6
# the _Settings, 7 the caller's clock in ms, 8 the hits to count (callers of one process that shared a trip),
# 9 (only after a read that found a corrupt value) that value.
# Returns the value on a hit (counted), 0 if the caller now holds the lock (or counts only), else the lock's ms
# to live.
_READ = _Script(b"""
local e = redis.pcall('HMGET', KEYS[1], 'v', 't', 'w')
if ARGV[9] then  -- the caller's last read was no hit (its tokens are taken back below, unless replaced meanwhile)
  redis.pcall('HINCRBY', KEYS[4], 'hits', -1)
  if not e.err and e[1] == ARGV[9] then  -- still that value: a miss (never a newer one)
    redis.pcall('HINCRBY', KEYS[4], 'tokens_saved', -(tonumber(e[2]) or 0))
    e = {}
  end
end
if e.err or not e[1] then  -- missing, or a key of another type that _FINISH overwrites
  if ARGV[1] == '' then return 0 end
  -- the GET lets a client's retry of this very call keep the lock it took
  if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) or redis.call('GET', KEYS[2]) == ARGV[1] then
    -- emptied, not deleted: the next entry's ID then follows the last one's (a key of another type goes)
    if redis.call('TYPE', KEYS[3]).ok == 'stream' then redis.call('XTRIM', KEYS[3], 'MAXLEN', 0)
    else redis.call('DEL', KEYS[3]) end
    return 0
  end
  return math.max(redis.call('PTTL', KEYS[2]), 1)
end
-- hot: HOT_THRESHOLD hits in one HOT_WINDOW, a window that opens at a hit, by the callers' clocks (TIME would
-- need an ACL category of its own).  pcall: a Redis out of memory (noeviction) refuses the bookkeeping, but still
-- serves the hit
local n = tonumber(ARGV[8])
local hits, age = n, tonumber(ARGV[7]) - (tonumber(e[3]) or 0)
if age >= 0 and age < tonumber(ARGV[5]) then  -- (a window a clock ahead of this one opened is no window)
  hits = tonumber(redis.pcall('HINCRBY', KEYS[1], 'n', n)) or 0
else
  redis.pcall('HSET', KEYS[1], 'w', ARGV[7], 'n', n)
end
-- slide by whole seconds (or a hundredth of HOT_TTL, if less), as EXPIRE would: a write a second, not a hit
local hot_ms = tonumber(ARGV[4])
if hits >= tonumber(ARGV[3]) and redis.call('PTTL', KEYS[1]) < hot_ms - math.min(1000, hot_ms / 100) then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])  -- the string: Lua would write a big number as 1e+17
end
redis.pcall('HINCRBY', KEYS[4], 'hits', n)
redis.pcall('HINCRBY', KEYS[4], 'tokens_saved', (tonumber(e[2]) or 0) * n)
if hits == n then  -- a new window: the shard's TTL needs refreshing only once a HOT_WINDOW, and STATS_TTL is longer
  redis.pcall('PEXPIRE', KEYS[4], ARGV[6])
end
return e[1]
""")
# KEYS: 1 a lock, 2 its stream.  ARGV: 1 the holder's token, 2 LOCK_TTL ms.  Returns 1 if the lock was still the
# holder's; then the chunks it published live as long as the lock.
_RENEW = _Script(b"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
""")
# KEYS: 1 a lock, 2 its stream.  ARGV: 1 the holder's token, 2 LOCK_TTL ms, 3 the first chunk's index, 4... the
# chunks' JSON.  Publishes chunks of a streamed answer to the waiters, with their holder's token, if the lock is
# still the holder's; returns 1 if so.
_PUBLISH = _Script(b"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 4, #ARGV do
  redis.call('XADD', KEYS[2], '*', 'i', tostring(tonumber(ARGV[3]) + i - 4), 'c', ARGV[i], 'o', ARGV[1])
end
return redis.call('PEXPIRE', KEYS[2], ARGV[2])
""")
# KEYS as _READ.  ARGV: 1 lock token, 2 JSON value ('' stores nothing), 3 its tokens, 4 ttl ms, 5 LOCK_TTL ms,
# 6 STATS_TTL ms, 7 (optional) the corrupt value the caller found.  The first answer stored wins: the value is
# stored only over no entry, another type or that corrupt value, else the stored one is returned.  Releases the
# lock if the caller still owns it, and wakes the waiters if either happened (trimming a stream's chunks).
_FINISH = _Script(b"""
local stored, wake = nil, false
if ARGV[2] ~= '' then
  stored = redis.pcall('HGET', KEYS[1], 'v')
  if type(stored) ~= 'string' or stored == ARGV[7] then
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'v', ARGV[2], 't', ARGV[3])
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    redis.call('HINCRBY', KEYS[4], 'misses', 1)
    redis.call('PEXPIRE', KEYS[4], ARGV[6])
    stored, wake = nil, true
  end
end
if redis.call('GET', KEYS[2]) == ARGV[1] then wake = redis.call('DEL', KEYS[2]) end
if wake then
  redis.call('XADD', KEYS[3], 'MAXLEN', '1', '*', 'stored', '1')
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
return stored
""")


def get_or_set(messages: list[dict], model: str, call_fn: Callable[[], Any], ttl: float | None = None, *,
               client: redis.Redis | redis.RedisCluster | None = None, params: dict | None = None) -> Any:
    """call_fn()'s answer to this request, as JSON gives it back; the model is called only on a miss. If call_fn
    returns an iterator (a stream), the answer is an iterator of its chunks, as JSON gives them back."""
    keys, ttl_ms, s = _checked(messages, model, call_fn, ttl, params)
    if inspect.iscoroutinefunction(call_fn):
        raise TypeError(f"call_fn is a coroutine function ({call_fn.__qualname__}): await aget_or_set for it")
    io, ended = _Blocking(_redis(client), call_fn, keys, messages, model, ttl_ms, s), threading.Lock()
    ended.acquire()  # a lock, not an Event: an Event costs a hit 3 µs more
    result = _now(_flow(io, _Flight(ended, threading.get_ident())))
    if isinstance(result, (_Stored, _Live, _Lead)):
        return _Chunks(_relay(io, result))
    return result


async def aget_or_set(messages: list[dict], model: str, call_fn: Callable[[], Any], ttl: float | None = None, *,
                      client: redis.asyncio.Redis | redis.asyncio.RedisCluster | None = None,
                      params: dict | None = None) -> Any:
    """get_or_set for asyncio: call_fn may return an awaitable, and no wait blocks the event loop. A stream
    (an iterator or async iterator, such as AsyncStream) is answered with an async iterator of its chunks."""
    keys, ttl_ms, s = _checked(messages, model, call_fn, ttl, params)
    io = _Async(_redis(client, sync=False), call_fn, keys, messages, model, ttl_ms, s)
    result = await _flow(io, _Flight(asyncio.Future(), asyncio.current_task()))
    if not isinstance(result, (_Stored, _Live, _Lead)):
        return result
    relay = _relay(io, result)
    await relay.__anext__()  # primed, so that dropping it unread closes it: a lock it holds is released
    return relay


def cached(create_fn: Callable[..., Any], /, *, ttl: float | None = None,
           client: redis.Redis | redis.RedisCluster | None = None, **request: Any) -> Any:
    """create_fn(**request)'s answer, keyed on the whole request: every keyword argument but TRANSPORT_ONLY ones
    is in the key, so none can be left out of it. model and messages are keyword arguments, as the openai SDK
    takes them. Returns what get_or_set returns."""
    messages, model, params = _request(create_fn, request)
    return get_or_set(messages, model, lambda: create_fn(**request), ttl, client=client, params=params)


async def acached(create_fn: Callable[..., Any], /, *, ttl: float | None = None,
                  client: redis.asyncio.Redis | redis.asyncio.RedisCluster | None = None, **request: Any) -> Any:
    """cached for asyncio, such as AsyncOpenAI's create."""
    messages, model, params = _request(create_fn, request)
    return await aget_or_set(messages, model, lambda: create_fn(**request), ttl, client=client, params=params)


def _request(create_fn: Any, request: dict) -> tuple[Any, Any, dict]:
    """A request's messages, model and other keyword arguments, or the error that names one that is no JSON."""
    if not callable(create_fn):
        raise TypeError(f"create_fn must be callable, got {type(create_fn).__name__}")
    params = {name: value for name, value in request.items() if name not in TRANSPORT_ONLY}
    for name, value in params.items():
        try:
            _canonical(value)
        except (TypeError, ValueError, RecursionError) as e:
            raise TypeError(f"{name} must be JSON to be part of the key, got {type(value).__name__}: {e}") from None
    return params.pop("messages", None), params.pop("model", None), params


def _checked(messages: Any, model: Any, call_fn: Any, ttl: Any, params: Any) -> tuple[list[str], int, _Settings]:
    """The request's keys, the entry's ttl and the settings, in ms; or the error that says what is wrong."""
    keys = _keys(messages, model, params)
    if not callable(call_fn) or _needs_arguments(call_fn):
        name = getattr(call_fn, "__qualname__", type(call_fn).__name__)
        raise TypeError(f"call_fn must be a callable taking no arguments, got {name}")
    ttl_ms = _ms("DEFAULT_TTL", DEFAULT_TTL) if ttl is None else _ms("ttl", ttl)
    return keys, ttl_ms, _settings(LOCK_TTL, HOT_THRESHOLD, HOT_TTL, HOT_WINDOW, STATS_TTL, MAX_WAIT, RETRY_AFTER)


def _needs_arguments(fn: Callable) -> bool:
    # read off a function's or method's code: inspect.signature costs 10-300 µs, more than a hit. Other callables
    # (a partial, a builtin, an object) tell at the call, and so does a decorator's (*args, **kwargs), which may
    # supply what the function it wraps needs
    func: Any = fn.__func__ if isinstance(fn, types.MethodType) else fn
    code, given = getattr(func, "__code__", None), func is not fn  # a method's first argument is given
    if not isinstance(code, types.CodeType):
        return False
    return (code.co_argcount - len(getattr(func, "__defaults__", None) or ()) > given
            or code.co_kwonlyargcount > len(getattr(func, "__kwdefaults__", None) or {}))


# The flow (coalesce, look up, lead or wait, call, store, release, wake) is written once, as coroutines that do
# their I/O through `io`, which also holds the call's request: _Blocking for get_or_set, whose coroutines never
# suspend, so that _now runs the flow to its end in one step; _Async for aget_or_set, on the event loop.

async def _flow(io: Any, mine: _Flight) -> Any:
    # Go's singleflight: one caller per process and request goes to Redis and the model, the others wait for it
    flight_key, deadline = (id(io.r), io.scope, io.keys[0]), time.monotonic() + MAX_WAIT
    if _streaming and _mark(io) in _streaming:  # it leads a stream of this request: don't wait for that
        return (await _trip(io, 0))[0]
    while (flight := _flights.setdefault(flight_key, mine)) is not mine:  # atomic: one dict operation
        if flight.leader == mine.leader:  # call_fn asked for its own request: don't wait for itself
            return (await _trip(io, 0))[0]
        flight.waiting.add(mine)
        try:
            ended = await io.join(flight) or mine in flight.counted  # counted as it gave up: it takes the answer
        finally:
            if not flight.counted:  # cancelled, or waited MAX_WAIT: it won't be answered, so it is no hit
                flight.waiting.discard(mine)
        if not ended:  # waited MAX_WAIT, as a Redis waiter would: call the model itself
            return (await _trip(io, 0))[0]
        if flight.error is not None:  # a copy where one can be made, so that each caller has its own traceback
            raise _copied(flight.error).with_traceback(flight.traceback)
        if flight.data is not None:
            if mine not in flight.counted:  # it joined as the leader counted
                await _count(io, 1)
            return _decoded(flight.data)
        # neither answer nor exception (a stream, or a cancelled leader): the next in line leads
    try:
        result, mine.data = await _trip(io, deadline)
    except Exception as e:
        mine.error, mine.traceback = e, e.__traceback__
        raise
    finally:
        if _flights.get(flight_key) is mine:  # not if a fork in call_fn forgot it
            del _flights[flight_key]
        mine.counted = set(mine.waiting)  # (one step: a set is copied holding the GIL)
        mine.end()
    if mine.counted and mine.data is not None:  # the followers were answered from Redis too: hits, in one trip
        await _count(io, len(mine.counted))
    return result


def _copied(error: Exception) -> Exception:
    try:
        return copy.copy(error)
    except Exception:  # an exception class copy can't rebuild: share the one object
        return error


async def _trip(io: Any, deadline: float, waiter: _Waiter | None = None) -> tuple[Any, str | bytes | None]:
    """The answer, and its JSON if it may be shared: from Redis, or from call_fn while holding the lock. A
    streamed answer is _Stored, _Live or _Lead, for _relay."""
    r, token, lost = io.r, secrets.token_hex(8), False
    corrupt: tuple[bytes, ...] = ()
    data: str | bytes | None
    may_hold = r is not None and _down_until.get(r, 0) <= time.monotonic()
    if may_hold:  # else Redis failed moments ago: don't wait on it again yet
        try:
            value, data, corrupt = await _lookup(io, token, deadline, waiter)
            if _down_until.pop(r, None):
                log.warning("llm cache: Redis answers again, caching resumed")
            if value is not _MISS:
                return value, data
        except _ERRORS as e:
            _failed(r, e)
            # a reply lost after the server ran the script may have given the caller the lock all the same:
            # then it renews, stores and releases like any holder (the owner check makes that safe)
            may_hold = lost = isinstance(e, redis.TimeoutError)
        except BaseException:  # cancelled or interrupted, maybe just after the script gave it the lock
            io.later(_finish(io, token, "", 0, corrupt))
            raise
    result, data, stop = None, None, io.renew(token) if may_hold else None
    try:
        result, data = _json(await io.call(), io.streams)
        if data is None:  # a stream: _relay stores it and releases the lock when it ends
            result, stop = _Lead(result, token if may_hold else None, corrupt, lost, stop), None
    finally:  # also when call_fn raised: release the lock at once, so the next caller need not wait
        if stop is not None:
            stop()
            tokens = _tokens(io.messages, io.model, result) if data else 0
            # after a timeout, the caller doesn't wait for another; another worker's answer stored first wins
            if (stored := await _store(io, token, data or "", tokens, corrupt, lost)) is not None:
                result, data = stored
    return result, data


def _json(result: Any, streams: tuple[type, ...] = (), what: str = "call_fn returned") -> tuple[Any, str | None]:
    """The answer as JSON gives it back, and that JSON; a stream as it is, with None."""
    if isinstance(result, streams):
        return result, None
    if inspect.iscoroutine(result):  # a lambda around an async call, given to get_or_set
        result.close()
        raise TypeError(f"{what} a coroutine: await aget_or_set (or acached) for an async call")
    if hasattr(result, "model_dump"):  # pydantic, such as the openai SDK's ChatCompletion
        result = result.model_dump(mode="json")
    try:
        data = json.dumps(result, separators=(",", ":"), allow_nan=False)
        return json.loads(data), data  # exactly what a later hit returns
    except (TypeError, ValueError, RecursionError) as e:
        raise TypeError(f"{what} a {type(result).__name__}, not JSON or pydantic: {e}") from None


async def _lookup(io: Any, token: str, deadline: float,
                  waiter: _Waiter | None) -> tuple[Any, str | bytes | None, tuple[bytes, ...]]:
    """The cached value and its JSON; or _MISS once the caller should call the model (holding the lock unless it
    waited until the deadline); or _Live chunks the holder is streaming. Last, a corrupt value found on the way,
    which the caller's store may replace."""
    corrupt: tuple[bytes, ...] = ()
    last_corrupt, live = corrupt, None
    try:
        while True:
            reply = await _script(io, _READ, io.keys, token, *io.s, int(time.time() * 1000), 1, *last_corrupt)
            last_corrupt = ()
            if not isinstance(reply, int):
                try:
                    return _decoded(reply), reply, corrupt
                except (ValueError, RecursionError):  # not JSON, or not UTF-8: the next read takes back its hit
                    corrupt = last_corrupt = (reply,)
                    continue
            left = deadline - time.monotonic()
            if reply == 0 or left <= 0:
                return _MISS, None, corrupt
            waiter = waiter or _Waiter()  # (made only now: a hit needs none)
            chunks = await waiter.wait(io, min(reply, left * 1000))
            if chunks:
                live = _Live(chunks, waiter)
                return live, None, corrupt
    finally:
        if live is None and waiter is not None:
            await waiter.close(io)


class _Waiter:
    """A waiter's sleep until the holder stores its answer, publishes a chunk of it or its lock expires: on a
    connection of the waiter's own, so that waiters never hold the pool's connections, but no more of them than
    the pool may open; past that, or if the server refuses one (maxclients), it polls every 50 ms."""

    def __init__(self) -> None:
        self.conn: Any = None
        self.slots: Any = None  # the pool's, once the waiter asked for one of its connections
        self.timeout: Any = None
        self.seen = "0-0"  # the last entry read: one a late holder stored, and which expired since, wakes no one
        self.released = False  # whether the last wait read the lock's release

    async def wait(self, io: Any, ms: float) -> list[tuple[int, bytes, bytes]]:
        """The chunks published since the last wait, if any: (index, JSON, the holder's token)."""
        stream = io.keys[2]
        if self.slots is None:
            owner, pool = _pool(io.r, stream)
            self.slots = _wait_slots.setdefault(owner, threading.BoundedSemaphore(pool.max_connections))
            if self.slots.acquire(blocking=False):
                self.conn = conn = pool.connection_class(**pool.connection_kwargs)
                self.timeout = conn.socket_timeout  # blocks last up to this, and the reply may take as long again
                conn.socket_timeout = 2 * self.timeout if self.timeout else None
        if self.conn is None:
            await io.sleep(min(ms, 50) / 1000)
            return []
        try:
            woken = await io.xread(self.conn, "XREAD", "BLOCK", max(1, int(min(ms, (self.timeout or 1) * 1000))),
                                   "STREAMS", stream, self.seen)
        except _ERRORS as e:  # the next wait connects again
            await io.close(self.conn)
            if not isinstance(e, redis.TimeoutError):  # slow or frozen, the next read tells; else dropped, refused
                # (maxclients) or an error reply: poll once first
                await io.sleep(min(ms, 50) / 1000)
            return []
        chunks = []
        entries = (next(iter(woken.values())) if isinstance(woken, dict) else woken[0][1]) if woken else []
        for entry, fields in entries:  # RESP3 replies a map, RESP2 a list of [stream, entries]
            self.seen = entry
            if fields[:1] == [b"i"]:  # a chunk; else the lock was released
                chunks.append((int(fields[1]), fields[3], fields[5]))
        self.released = len(chunks) < len(entries)
        return chunks

    async def close(self, io: Any) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            self.slots.release()  # first: a second cancellation may interrupt the close
            await io.close(conn)


def _pool(r: Any, key: str) -> tuple[Any, Any]:
    """Whose waiters' connections are counted, and what makes them: connection_class, _kwargs, max_connections."""
    if isinstance(r, redis.RedisCluster):
        pool = r.get_node_from_key(key).redis_connection.connection_pool
        return pool, pool
    if isinstance(r, redis.asyncio.RedisCluster):  # a node makes its own connections, and takes no weak reference
        return r, r.get_node_from_key(key)
    return r.connection_pool, r.connection_pool


async def _script(io: Any, script: _Script, keys: list[str], *args: Any) -> Any:
    """One round trip; replies undecoded. A pool with no connection free is waited on, up to LOCK_TTL."""
    give_up = None
    while True:
        try:
            try:  # EVALSHA straight from the client: through redis-py's Script a hit measured 6-10% slower
                return await io.command("EVALSHA", script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:  # a new or flushed server: EVAL runs the script and caches it
                return await io.command("EVAL", script.source, len(keys), *keys, *args)
        except redis.ConnectionError as e:
            give_up = give_up or time.monotonic() + LOCK_TTL
            if not _exhausted(e) or time.monotonic() > give_up:
                raise
            await io.sleep(0.002)


async def _renewal(io: Any, ended: Callable[[float], Awaitable[bool]], token: str) -> None:
    # python-redis-lock's auto_renewal: the holder's lock outlives any call, and dies with the holder's process.
    # Not a stream's whose caller has held a chunk for MAX_WAIT, though (its waiters have given up by then): the
    # iterator may be unreachable but alive, in a traceback, say
    while not await ended(io.s.lock_ms / 3000) and time.monotonic() - (io.paused or math.inf) < MAX_WAIT:
        try:
            if not await _script(io, _RENEW, io.keys[1:3], token, io.s.lock_ms):
                return  # not the holder (any more): the first answer stored wins
        except _ERRORS:
            pass  # Redis is away; if it stays away the lock expires, which costs a duplicate call at most


async def _finish(io: Any, token: str, data: str | bytes, tokens: int,
                  corrupt: tuple[bytes, ...]) -> tuple[Any, bytes] | None:
    """Store, release and wake; the answer stored before this one, if there was one."""
    for again in (True, False):
        try:
            stored = await _script(io, _FINISH, io.keys, token, data, tokens, io.ttl_ms, io.s.lock_ms,
                                   io.s.stats_ms, *corrupt)
            return None if stored is None else (_decoded(stored), stored)
        except _ERRORS as e:
            # dropped during the call (a restart, an idle timeout): once more, as a client's own retry would;
            # the owner check makes a repeat harmless
            if again and isinstance(e, redis.ConnectionError) and not _exhausted(e):
                continue
            _failed(io.r, e)
        except (ValueError, RecursionError):  # the first answer is corrupt; the next reader replaces it
            pass
        return None
    return None  # (not reached: the second try returns)


async def _store(io: Any, token: str, data: str | bytes, tokens: int, corrupt: tuple[bytes, ...],
                 later: bool) -> tuple[Any, bytes] | None:
    """_finish, which a cancellation can't stop; in the background if later, else the answer stored first, if
    another was."""
    finishing = _finish(io, token, data, tokens, corrupt)
    if later:
        io.later(finishing)
        return None
    return await io.settle(finishing)


async def _count(io: Any, hits: int) -> None:
    """Counts hits on the entry (statistics, hot window) for callers answered by another caller's trip."""
    if io.r is not None and _down_until.get(io.r, 0) <= time.monotonic():
        try:
            await _script(io, _READ, io.keys, "", *io.s, int(time.time() * 1000), hits)
        except _ERRORS as e:
            _failed(io.r, e)


# A streamed answer is stored as one entry: RS (which JSON text never holds), the token of the holder that
# streamed it, and the JSON list of its chunks. While the holder streams, each chunk is also published to the
# request's stream, with the holder's token, where its waiters read it live.

class _Stored(list):
    """A streamed answer's stored chunks, as JSON gives them back, and the token of the holder that streamed them."""

    token = b""


class _Live(NamedTuple):
    """Chunks of its answer that the lock's holder is streaming from the model."""

    chunks: list[tuple[int, bytes, bytes]]  # (index, JSON, the holder's token), as published so far
    waiter: _Waiter  # the connection that reads the next ones


class _Lead(NamedTuple):
    """The model's stream, for the caller to relay, publish and, when it ends, store and release."""

    source: Iterator | AsyncIterator
    token: str | None  # the lock's, if the caller may hold it; None when Redis is down
    corrupt: tuple[bytes, ...]
    lost: bool  # the lock's reply was lost: the store must not hold the caller up
    stop: Callable[[], None] | None  # ends the lock's renewal


def _decoded(data: str | bytes) -> Any:
    """An answer from its JSON; a streamed one's chunks as _Stored. ValueError if the JSON is corrupt."""
    if data[:1] not in (b"\x1e", "\x1e"):
        return json.loads(data)
    chunks = json.loads(data[17:])  # after RS and the 16 hex digits of a token
    if not isinstance(chunks, list):
        raise ValueError("a stream's entry holds no list of chunks")
    stored = _Stored(chunks)
    stored.token = data[1:17] if isinstance(data, bytes) else data[1:17].encode()
    return stored


async def _relay(io: Any, got: _Stored | _Live | _Lead) -> AsyncGenerator[Any, None]:
    """A streamed answer's chunks: replayed from its entry; live as the lock's holder publishes them; or from
    the model while holding the lock: published as they come, and stored, and the lock released, at their end."""
    n, waiter, entry, following = 0, got.waiter if isinstance(got, _Live) else _Waiter(), None, b""
    mark: tuple | None = None  # the caller's, in _streaming, once it leads
    texts: list[str] = []  # the model's chunks, as JSON
    outbox: Any = None  # the chunks to publish, for a thread or task beside the caller
    try:
        if isinstance(got, _Lead):  # now, so that the caller, asking again before it reads, doesn't wait for itself
            mark = _leading(io)
        io.paused = time.monotonic()
        yield None  # primed: from here, closing the iterator or dropping it runs the finally block
        io.paused = None
        while isinstance(got, _Live):
            for index, data, holder in got.chunks:
                if n and holder != following:  # a new holder's (the last one's died): no chunk of it follows on
                    _interrupted()
                if index != n:  # a repeat (a publish retried), or one the caller can't have yet
                    continue
                yield json.loads(data)
                n, following = n + 1, holder
                io.call_fn = _interrupted  # the caller holds chunks of this answer: the model can't finish it
            # the next chunks; after the release, or a wait with none, the entry or the lock tells what happened
            chunks = [] if waiter.released else await waiter.wait(io, io.s.lock_ms)
            got = _Live(chunks, waiter) if chunks else (await _trip(io, time.monotonic() + MAX_WAIT, waiter))[0]
        if isinstance(got, _Stored):
            if n and got.token != following:  # another holder's answer, stored first
                _interrupted()
            for value in got[n:]:
                yield value
            return
        if not isinstance(got, _Lead):
            raise TypeError(f"call_fn returned a stream for this request before, and now a {type(got).__name__}")
        mark = mark or _leading(io)  # (a follower that now leads)
        if got.token is not None and _down_until.get(io.r, 0) <= time.monotonic():
            outbox = io.publisher(got.token)  # beside the caller, which gets each chunk at once
        while (chunk := await io.next(got.source)) is not _MISS:
            value, text = _json(chunk, what="call_fn's stream gave")
            if outbox is not None:
                outbox.put_nowait((len(texts), text))
            texts.append(text)  # type: ignore[arg-type]
            io.paused = time.monotonic()
            yield value
            io.paused = None
        entry = f"\x1e{got.token}[{','.join(texts)}]"
    finally:  # also when the stream failed or its caller stopped: the lock is released at once, the waiters told
        await waiter.close(io)
        if outbox is not None:
            outbox.put_nowait(None)  # the publisher's last batch: what it has, and no more
        if mark is not None and (left := _streaming.pop(mark, 1) - 1):  # (it may lead another, asking again)
            _streaming[mark] = left
        if isinstance(got, _Lead):
            await _ended(io, got, entry)


async def _ended(io: Any, lead: _Lead, entry: str | None) -> None:
    """Stores a stream that ended (entry) and releases the lock; or, if it broke off, releases the lock and
    closes the model's stream. Chunks still being published then are refused: the lock is no longer theirs."""
    if lead.stop is not None:
        lead.stop()
    try:
        if lead.token is not None:  # a store after Redis failed must not cost another timeout
            tokens = _tokens(io.messages, io.model, _decoded(entry)) if entry else 0
            await _store(io, lead.token, entry or "", tokens, lead.corrupt,
                         lead.lost or _down_until.get(io.r, 0) > time.monotonic())
    finally:  # (also when a cancellation is delivered again during the store)
        close = getattr(lead.source, "aclose", None) or getattr(lead.source, "close", None)
        if entry is None and close is not None and inspect.isawaitable(closing := close()):
            await closing  # the model's stream, stopped early: its connection goes back to its pool


async def _publisher(io: Any, outbox: Any, token: str) -> None:
    """Publishes a leader's chunks, in order, in batches of those waiting, until None: none after the lock was
    lost or Redis failed (then the waiters read the entry)."""
    while True:
        batch = [await io.get(outbox)]
        while not outbox.empty():
            batch.append(outbox.get_nowait())
        last = None in batch
        batch = batch[:batch.index(None)] if last else batch
        try:
            if batch and not await _script(io, _PUBLISH, io.keys[1:3], token, io.s.lock_ms, batch[0][0],
                                           *(text for _, text in batch)):
                return
        except Exception as e:  # beside the caller, nothing may raise: a closed client, say
            if isinstance(e, _ERRORS):
                _failed(io.r, e)
            return
        if last:
            return


def _mark(io: Any) -> tuple:
    """The caller, in _streaming: its request, and its thread, or its loop and task (a weak reference: a task
    holds the stream it returns). Through any client: its own lock is in the way on each."""
    if io.scope == "threads":
        return io.keys[0], threading.get_ident()
    task = asyncio.current_task()
    return io.keys[0], id(io.scope), task and weakref.ref(task)


def _leading(io: Any) -> tuple:
    """Counts the caller as leading a stream of the request, until _relay's end takes it back; its mark."""
    mark = _mark(io)
    _streaming[mark] = _streaming.get(mark, 0) + 1
    return mark


def _interrupted() -> Any:
    raise StreamInterrupted("the caller streaming this answer from the model failed or stopped, after some of its "
                            "chunks were handed out here; ask again for the whole answer")


class _Chunks:
    """get_or_set's answer to a stream: an iterator of its chunks, which _relay gives."""

    def __init__(self, relay: AsyncGenerator) -> None:
        self._relay, hooks = relay, sys.get_asyncgen_hooks()
        sys.set_asyncgen_hooks(None, None)  # closed when dropped, not by an event loop this thread may run
        try:
            _now(relay.__anext__())  # primed, so that dropping it unread closes it: a lock it holds is released
        finally:
            sys.set_asyncgen_hooks(*hooks)

    def __iter__(self) -> _Chunks:
        return self

    def __next__(self) -> Any:
        try:
            return _now(self._relay.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        _now(self._relay.aclose())


class _Io:
    """One call: its client, call_fn and request, in the units Redis takes; a subclass does the flow's I/O."""

    paused: float | None = None  # since when a stream's caller has held its last chunk

    def __init__(self, r: Any, call_fn: Callable[[], Any], keys: list[str], messages: list, model: str,
                 ttl_ms: int, s: _Settings) -> None:
        self.r, self.call_fn, self.keys, self.messages, self.model, self.ttl_ms, self.s = (
            r, call_fn, keys, messages, model, ttl_ms, s)


class _Blocking(_Io):
    """The flow's I/O for get_or_set: blocking sockets, and threads for what runs beside the caller."""

    scope = "threads"  # whose callers may share a flight (a client is None for every path when REDIS_URL is bad)
    streams = (Iterator,)  # what call_fn may return as a stream

    async def command(self, *args: Any) -> Any:
        return self.r.execute_command(*args, NEVER_DECODE=True)

    async def xread(self, conn: Any, *args: Any) -> Any:
        conn.send_command(*args)
        return conn.read_response(disable_decoding=True)

    async def close(self, conn: Any) -> None:
        conn.disconnect()

    async def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def join(self, flight: _Flight) -> bool:
        if not flight.ended.acquire(timeout=MAX_WAIT):  # type: ignore[union-attr]
            return False
        flight.ended.release()  # type: ignore[union-attr]
        return True

    def renew(self, token: str) -> Callable[[], None]:
        """Renews the lock, from a thread, until the function returned is called."""
        done = threading.Event()

        async def ended(seconds: float) -> bool:
            return done.wait(seconds)

        renewal = _renewal(self, ended, token)
        if not _start(_now, renewal):  # no thread to be had (at interpreter shutdown, say)
            renewal.close()
        return done.set

    async def call(self) -> Any:
        return self.call_fn()

    async def next(self, stream: Iterator) -> Any:
        return next(stream, _MISS)

    def publisher(self, token: str) -> queue.SimpleQueue | None:
        """A queue whose chunks a thread publishes."""
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        publisher = _publisher(self, outbox, token)
        if not _start(_now, publisher):  # no thread to be had: then the waiters read the entry
            publisher.close()
            return None
        return outbox

    async def get(self, outbox: queue.SimpleQueue) -> Any:
        return outbox.get()

    def later(self, coroutine: Coroutine) -> None:
        if not _start(_now, coroutine):
            _now(coroutine)

    async def settle(self, coroutine: Coroutine) -> Any:
        return await coroutine


class _Async(_Io):
    """The flow's I/O for aget_or_set: redis.asyncio, and tasks for what runs beside the caller."""

    streams = (Iterator, AsyncIterator)

    def __init__(self, *call: Any) -> None:
        super().__init__(*call)
        self.scope = asyncio.get_running_loop()

    async def command(self, *args: Any) -> Any:
        return await self.r.execute_command(*args, NEVER_DECODE=True)

    async def xread(self, conn: Any, *args: Any) -> Any:
        await conn.send_command(*args)
        return await conn.read_response(disable_decoding=True)

    async def close(self, conn: Any) -> None:
        await conn.disconnect()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def join(self, flight: _Flight) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(flight.ended), MAX_WAIT)  # type: ignore[arg-type]
            return True
        except asyncio.TimeoutError:
            return False

    def renew(self, token: str) -> Callable[[], None]:
        """Renews the lock, from a task, until the function returned is called."""
        done = asyncio.Event()

        async def ended(seconds: float) -> bool:
            try:
                return await asyncio.wait_for(done.wait(), seconds)
            except asyncio.TimeoutError:
                return False

        self.later(_renewal(self, ended, token))
        return done.set

    async def call(self) -> Any:
        result = self.call_fn()
        return await result if inspect.isawaitable(result) else result

    async def next(self, stream: Iterator | AsyncIterator) -> Any:
        return await anext(stream, _MISS) if isinstance(stream, AsyncIterator) else next(stream, _MISS)

    def publisher(self, token: str) -> asyncio.Queue:
        """A queue whose chunks a task publishes."""
        outbox: asyncio.Queue = asyncio.Queue()
        self.later(_publisher(self, outbox, token))
        return outbox

    async def get(self, outbox: asyncio.Queue) -> Any:
        return await outbox.get()

    def later(self, coroutine: Coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        return task

    async def settle(self, coroutine: Coroutine) -> Any:  # a store and release that a cancellation can't stop
        return await asyncio.shield(self.later(coroutine))


def _now(coroutine: Coroutine) -> Any:
    """Runs to its end a coroutine that never suspends: the flow on blocking I/O."""
    try:
        coroutine.send(None)
    except StopIteration as end:
        return end.value
    coroutine.close()
    raise RuntimeError("the flow suspended on blocking I/O")


def _start(target: Callable, *args: Any) -> bool:
    try:
        threading.Thread(target=target, args=args, daemon=True).start()
        return True
    except RuntimeError:  # no thread to be had (at interpreter shutdown, say): do without
        return False


def stats(client: redis.Redis | redis.RedisCluster | None = None) -> dict[str, float]:
    """Hits, misses, hit_rate and tokens_saved under the current PREFIX. Redis errors are raised here."""
    return _totals(_shards(_redis(client)).execute())


async def astats(client: redis.asyncio.Redis | redis.asyncio.RedisCluster | None = None) -> dict[str, float]:
    """stats for asyncio."""
    return _totals(await _shards(_redis(client, sync=False)).execute())


def _shards(r: Any) -> Any:
    """A pipeline that reads the 256 stats shards."""
    if r is None:
        raise ValueError("REDIS_URL is not a Redis URL (redis://, rediss:// or unix://)")
    pipe = r.pipeline(transaction=False)
    for tag in range(256):
        pipe.hgetall(_tag(f"{tag:02x}") + "stats")
    return pipe


def _totals(shards: list[dict]) -> dict[str, float]:
    totals = {"hits": 0, "misses": 0, "tokens_saved": 0}
    for shard in shards:
        for field, n in shard.items():
            totals[field if isinstance(field, str) else field.decode()] += int(n)
    calls = totals["hits"] + totals["misses"]
    return {**totals, "hit_rate": totals["hits"] / calls if calls else 0.0}
