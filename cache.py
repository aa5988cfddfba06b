"""Cache LLM calls in Redis: each distinct request calls the model once, for every worker of a fleet.

    out = get_or_set(messages, "gpt-4.1-mini", lambda: client.chat.completions.create(...).model_dump())
    out = await aget_or_set(messages, "gpt-4.1-mini", lambda: aclient.chat.completions.create(...))
    client = OpenAI(http_client=http_client())  # every SDK call, in the SDK's own types, keyed on the HTTP request

A hit is one HGET. A miss runs one script that looks up or takes the request's lock, calls the model, and runs one
that stores, releases and wakes the waiters. Beside the callers, one worker (a thread; a task per event loop)
renews the locks held, publishes streams' chunks and sends the hit counts in batches. get_or_set is plain
blocking code; aget_or_set is its twin, function for function. Sections: settings, keys and JSON, arguments,
clients, Lua, the worker, get_or_set, streams, aget_or_set, the HTTP layer, stats.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import re
import reprlib
import secrets
import sys
import threading
import time
import types
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NamedTuple

import redis
import redis.asyncio

# Durations are seconds, int or float. Every setting is read at call time: cache.HOT_TTL = 3600 applies next call.
PREFIX = os.environ.get("LLM_CACHE_PREFIX", "llm:v2:")  # bump it ("llm:v3:") to orphan every entry, no flush
DEFAULT_TTL = 24 * 3600  # an entry's lifetime unless it turns hot
HOT_THRESHOLD = 10  # hits within HOT_WINDOW that make an entry hot
HOT_WINDOW = 3600  # older hits don't count toward HOT_THRESHOLD
HOT_TTL = 6 * 3600  # hits on a hot entry extend its life to this from now, never shorten it (0: never)
LOCK_TTL = 10  # how long a dead holder's lock blocks the others; a live holder renews it every LOCK_TTL / 3
MAX_WAIT = 900  # how long a waiter waits for a live holder before calling itself (the openai SDK gives up at 600)
STATS_TTL = 30 * 24 * 3600  # how long a stats shard outlives the last count sent to it (> HOT_WINDOW)
RETRY_AFTER = 5  # how long to leave a failed Redis alone: an outage costs one timeout, not one per call
REDIS_TIMEOUT = 0.5  # socket timeouts of the client made from REDIS_URL: the most a frozen Redis costs a call
DEFAULT_ENCODING = "cl100k_base"  # tiktoken's encoding for models it does not know
# The HTTP layer caches POSTs of JSON to paths ending so (not an Assistants thread's /messages, which creates one)
GENERATION_PATHS = ("/chat/completions", "/completions", "/embeddings", "/responses", "/messages")
IGNORED_FIELDS = ("user", "metadata", "store", "safety_identifier", "prompt_cache_key", "service_tier")  # who asks
VERSION_HEADERS = ("anthropic-version", "anthropic-beta", "openai-beta")  # the only request headers in the key

log = logging.getLogger(__name__)


class StreamInterrupted(Exception):
    """A streamed answer broke off after some of its chunks were handed out, because the caller streaming it
    from the model failed or stopped. Nothing was stored: ask again for the whole answer."""


_MISS = object()  # a cached None, "" or [] is a hit
_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
_RS = "\x1e"  # starts a stored stream's entry: JSON text never holds it
_MAX_SECONDS = (2**63 - 1) // 1000 - 2**32  # Redis refuses expiries past 2**63 - 1 ms after 1970 (2**32 s to spare)
_MAX_TIMEOUT = int(threading.TIMEOUT_MAX)  # the longest timeout a lock, an event or a socket takes
# an SSE stream's final event, whole: its lines and the blank line after them (a proxy may cut it short)
_FINAL = re.compile(r"^(data: ?\[DONE\]|event: ?(message_stop|response\.completed)\r?\n(data:.*\r?\n)+)\r?\n", re.M)
_ENDING = re.compile(r"^(data: ?\[DONE\]|event: ?(message_delta|message_stop|response\.completed))", re.M)
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_down_until: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> when to try it again
_warned_until: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> when to warn of its errors again
_gates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> a semaphore as wide as its pool
_wait_slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pool -> waiters' connections it may open
_tasks: set[asyncio.Task] = set()  # stores that a cancellation can't stop, held until they end
_flights: dict[tuple, Any] = {}  # (client, threads or loop, entry) -> the future of the caller leading it
_leading: contextvars.ContextVar[tuple] = contextvars.ContextVar("llm_cache_leading", default=())
_counting = threading.Lock()  # guards the hit tallies, which threads add to and the worker swaps out
_starting = threading.Lock()  # so that one thread starts the worker
_encodings: dict[str, Any] = {}  # tiktoken encoding name -> the encoding, once loaded
_loads: dict[str, float] = {}  # encoding name -> when its last load failed (inf while one runs)
_loading = threading.Lock()  # so that one thread starts a load, and one warns


# ---------------------------------------------------------------- keys, JSON and tokens (no I/O: both paths)

def _keys(messages: Any, model: Any, params: Any, shape: Any = None) -> list[str]:
    """The request's entry, lock, wake-up stream and stats shard, all in one Cluster slot (one hash tag)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TypeError(f"messages must be a list of dicts, got {reprlib.repr(messages)}")
    if not isinstance(model, str):
        raise TypeError(f"model must be a non-empty str, got {type(model).__name__}")
    if not model:
        raise ValueError("model must be a non-empty str, got ''")
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"params must be a dict or None, got {type(params).__name__}")
    if shape is not None and not hasattr(shape, "model_json_schema"):
        raise TypeError(f"response_model must be a pydantic model class, got {reprlib.repr(shape)}")
    try:  # the schema is in the key: a model that gains a field makes new entries, not old shapes
        blob = _canonical([model, messages, params or {}] + ([_schema(shape)] if shape else []))
    except (TypeError, ValueError) as e:
        raise TypeError(f"messages and params must be JSON-serializable: {e}") from None
    except RecursionError:
        raise ValueError("messages and params nest too deeply to be serialized") from None
    return _digest(blob)


@functools.lru_cache(maxsize=256)  # model_json_schema costs more than a hit
def _schema(shape: Any) -> dict:
    return shape.model_json_schema()


def _digest(blob: str) -> list[str]:
    digest = hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()
    tag = f"{PREFIX}{{{digest[:2]}}}"  # entries spread over 256 tags, so over every node of a Cluster
    return [tag + digest, tag + digest + ":lock", tag + digest + ":stored", tag + "stats"]


def _json(result: Any, what: str = "call_fn returned") -> tuple[Any, str]:
    """The answer as JSON gives it back, and that JSON."""
    if inspect.iscoroutine(result):  # a lambda around an async call, given to get_or_set
        result.close()
        raise TypeError(f"{what} a coroutine: await aget_or_set for an async call")
    if hasattr(result, "model_dump"):  # pydantic, such as the openai SDK's ChatCompletion: by field name, as
        result = result.model_dump(mode="json", by_alias=False)  # its model_dump() gives it, whatever its config
    try:
        data = json.dumps(result, separators=(",", ":"), allow_nan=False)
        return json.loads(data), data  # exactly what a later hit returns
    except (TypeError, ValueError, RecursionError) as e:
        raise TypeError(f"{what} a {type(result).__name__}, not JSON or pydantic: {e}") from None


def _entry(result: Any) -> tuple[Any, bytes]:
    """An answer as a hit gives it back, and its entry's bytes."""
    if isinstance(result, _Http):
        return result, result.entry()
    value, text = _json(result)
    return value, text.encode()


class _Http(NamedTuple):
    """An HTTP answer as stored: its status, content-type and body, and no other header."""

    status: int
    type: str
    body: bytes

    def entry(self) -> bytes:
        return b"\x1f%d %s\n" % (self.status, self.type.encode()) + self.body  # US: JSON text never holds it


class _Stored(list):
    """A streamed answer's chunks, as stored: RS, the token of the holder that streamed it, the JSON list."""

    token = b""


def _decoded(data: bytes) -> Any:
    """An entry's answer; a stream's as _Stored, an HTTP answer's as _Http. ValueError if the entry is corrupt."""
    if data[:1] == b"\x1f":
        head, _, body = data[1:].partition(b"\n")
        status, _, kind = head.decode().partition(" ")
        return _Http(int(status), kind, body)
    if data[:1] != b"\x1e":
        return json.loads(data)
    chunks = json.loads(data[17:])  # after RS and the 16 hex digits of the token
    if not isinstance(chunks, list):
        raise ValueError("a stream's entry holds no list of chunks")
    stored = _Stored(chunks)
    stored.token = data[1:17]
    return stored


def _complete(chunks: list, sse: bool = False, exhausted: bool = True) -> bool:
    """Whether a stream came to its final event, so that it may be stored: OpenAI chat chunks carry each choice's
    finish_reason, Anthropic's events a message_stop, the Responses API's a response.completed; an HTTP stream (sse)
    ends with one of those events, or data: [DONE]. A proxy that gives up can end a stream cleanly without them. A
    stream that carried an error event never is. Any other stream is complete if it was exhausted."""
    events = _events(chunks) if sse else chunks
    dicts = [event for event in events if isinstance(event, dict)]
    if any(event.get("error") or event.get("type") == "error" for event in dicts):  # as the SDKs raise them
        return False
    if sse:
        return _FINAL.search("".join(chunks)) is not None
    if any(chunk.get("object") == "chat.completion.chunk" for chunk in dicts):
        choices = [choice for chunk in dicts for choice in chunk.get("choices") or [] if isinstance(choice, dict)]
        finished = {choice.get("index") for choice in choices if choice.get("finish_reason")}
        return bool(finished) and finished >= {choice.get("index") for choice in choices}  # each of n choices
    kinds = {str(chunk.get("type")) for chunk in dicts}
    if "message_start" in kinds:
        return "message_stop" in kinds
    if any(kind.startswith("response.") for kind in kinds):
        return "response.completed" in kinds
    return exhausted


def _events(chunks: list[str]) -> list:
    """The JSON events of an HTTP stream's text (SSE)."""
    events = []
    text = "".join(chunks).encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # characters split by chunks
    for line in text.splitlines():
        try:
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
        except ValueError:  # data: [DONE]
            pass
    return events


def _tokens(messages: list, model: str, value: Any) -> int:
    """What producing an answer cost: its usage (a stream's, merged over its chunks), else tiktoken's count of
    the prompt and the answer's text."""
    try:
        value = json.loads(value.body) if isinstance(value, _Http) else value
        chunks = value if isinstance(value, list) else [value]
        usage: dict = {}
        for chunk in chunks:
            if isinstance(chunk, dict):  # OpenAI's usage; Anthropic's (message_start, message_delta); Responses'
                for found in (chunk.get("usage"), (chunk.get("message") or {}).get("usage"),
                              (chunk.get("response") or {}).get("usage")):
                    usage.update(found if isinstance(found, dict) else {})
        total = usage.get("total_tokens") or sum(usage.get(name) or 0 for name in (
            "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens"))
        if isinstance(total, int) and total > 0:
            return total
        encoding = _encoding(model)
        texts = [m.get("content") for m in messages] + [_text(chunk) for chunk in chunks]
        return 0 if encoding is None else sum(len(encoding.encode(t, disallowed_special=())) for t in texts
                                              if isinstance(t, str))
    except Exception as e:  # statistics must never fail a call
        log.warning("llm cache: counting 0 tokens for an answer of %r: %s: %.200s", model, type(e).__name__, e)
        return 0


def _text(answer: Any) -> str:
    """An answer's text: a chat completion's messages, a stream chunk's deltas, or the answer, if a string."""
    if not isinstance(answer, dict):
        return answer if isinstance(answer, str) else ""
    parts = [choice.get("message") or choice.get("delta") or {} for choice in answer.get("choices") or []]
    return "".join(part.get("content") or "" for part in parts)


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


def _start(target: Callable, *args: Any) -> threading.Thread | None:
    try:
        thread = threading.Thread(target=target, args=args, daemon=True, name="llm-cache")
        thread.start()
        return thread
    except RuntimeError:  # no thread to be had (at interpreter shutdown, say)
        return None


# ---------------------------------------------------------------- arguments and settings (both paths)

class _Settings(NamedTuple):  # in the milliseconds Redis takes
    ttl_ms: int
    lock_ms: int
    hot_threshold: int
    hot_ms: int
    window_ms: int
    stats_ms: int


@functools.lru_cache(maxsize=64, typed=True)  # checked once per combination: a hit stays cheap
def _settings(ttl: Any, default_ttl: Any, lock_ttl: Any, hot_threshold: Any, hot_ttl: Any, hot_window: Any,
              stats_ttl: Any, max_wait: Any, retry_after: Any) -> _Settings:
    if isinstance(hot_threshold, bool) or not isinstance(hot_threshold, int):
        raise TypeError(f"HOT_THRESHOLD must be a whole number of hits, got {type(hot_threshold).__name__}")
    if hot_threshold < 1:
        raise ValueError(f"HOT_THRESHOLD must be at least 1, got {hot_threshold}")
    _ms("MAX_WAIT", max_wait, least=0, most=_MAX_TIMEOUT)
    _ms("RETRY_AFTER", retry_after, least=0)
    # the renewals, every LOCK_TTL / 3, must outpace a busy machine: under 0.1 s they lost the lock in tests
    s = _Settings(_ms("DEFAULT_TTL", default_ttl) if ttl is None else _ms("ttl", ttl),
                  _ms("LOCK_TTL", lock_ttl, least=0.1, most=_MAX_TIMEOUT), int(hot_threshold),
                  _ms("HOT_TTL", hot_ttl, least=0), _ms("HOT_WINDOW", hot_window), _ms("STATS_TTL", stats_ttl))
    if s.stats_ms <= s.window_ms:  # a shard must outlive the window its hits were counted in
        raise ValueError(f"STATS_TTL must be longer than HOT_WINDOW, got {stats_ttl} and {hot_window}")
    return s


def _ms(name: str, seconds: Any, least: float = 0.001, most: float = _MAX_SECONDS) -> int:
    """seconds in the whole milliseconds Redis takes, or the error that says why they can't be."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(seconds).__name__}")
    if not least <= seconds <= most:  # also refuses nan
        raise ValueError(f"{name} must be from {least} to {most} seconds, got {seconds}")
    return math.ceil(seconds * 1000)


class _Req:
    """One call: its client, keys, call_fn, request and settings; and, once it holds the request's lock, what
    its holder needs: the token, when to renew, and a stream's chunks for the worker to publish."""

    token, corrupt, held, leading = "", b"", False, False
    renew_at, sent = 0.0, 0  # when the holder renews next; how many of a stream's chunks the worker published
    paused: float | None = None  # since when a stream's caller has held its last chunk
    max_age: int | None = None  # ms an entry may have been stored, for HTTP's Cache-Control
    sse, outcome = False, "hit"  # an HTTP stream's; what the answer came from: hit, miss or bypass
    shape: Any = None  # the pydantic model the caller wants the answer as

    def __init__(self, r: Any, keys: list[str], call_fn: Any, ttl: Any, chores: _Chores, messages: list,
                 model: str) -> None:
        # call_fn's parameters, read off its code: inspect.signature costs 10-300 µs, more than a hit. Other
        # callables (a partial, a builtin, an object) tell at the call, and so does a decorator's (*args, **kwargs)
        func: Any = call_fn.__func__ if isinstance(call_fn, types.MethodType) else call_fn
        code, given = getattr(func, "__code__", None), func is not call_fn  # a method's first argument is given
        if not callable(call_fn) or isinstance(code, types.CodeType) and (
                code.co_argcount - len(getattr(func, "__defaults__", None) or ()) > given
                or code.co_kwonlyargcount > len(getattr(func, "__kwdefaults__", None) or {})):
            name = getattr(call_fn, "__qualname__", type(call_fn).__name__)
            raise TypeError(f"call_fn must be a callable taking no arguments, got {name}")
        self.s = _settings(ttl, DEFAULT_TTL, LOCK_TTL, HOT_THRESHOLD, HOT_TTL, HOT_WINDOW, STATS_TTL, MAX_WAIT,
                           RETRY_AFTER)
        self.r, self.keys, self.call_fn, self.chores = r, keys, call_fn, chores
        self.messages, self.model = messages, model  # for tiktoken, when an answer carries no usage
        self.texts: list[str] = []  # a stream's chunks, as JSON, for the worker to publish


# ---------------------------------------------------------------- clients and the breaker (both paths)

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
    made = _chores(sync=False).clients  # an asyncio client serves one event loop only
    if (url, timeout, type(timeout)) not in made:
        made[url, timeout, type(timeout)] = _client(url, timeout, sync)
    return made[url, timeout, type(timeout)]


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


def _up(r: Any) -> bool:
    return r is not None and _down_until.get(r, 0) <= time.monotonic()


def _failed(r: Any, error: Exception) -> None:
    now = time.monotonic()
    if isinstance(error, redis.ResponseError) or _busy(error):  # Redis is up (out of memory, say): not skipped
        if _warned_until.get(r, 0) < now:  # one warning per RETRY_AFTER, not one per call
            log.warning("llm cache: Redis refused (%s: %s); this call is not cached", type(error).__name__, error)
            _warned_until[r] = now + RETRY_AFTER
        return
    if r not in _down_until:  # once per outage, not once per call
        log.warning("llm cache: Redis failed (%s: %s); calling the model directly, retrying every %ss",
                    type(error).__name__, error, RETRY_AFTER)
    _down_until[r] = now + RETRY_AFTER


def _busy(error: Exception) -> bool:
    # Redis is fine, but has no connection for us now: our pool is exhausted, or the server is at maxclients
    # (redis-py 5.0 raises plain ConnectionErrors for both, BlockingConnectionPool's after its own timeout)
    return isinstance(error, redis.ConnectionError) and (
        type(error).__name__ in ("MaxConnectionsError", "MaxClientsReachedError")
        or str(error) in ("Too many connections", "No connection available.", "max number of clients reached"))


def _gate(r: Any) -> Any:
    """A semaphore as wide as an asyncio client's pool, so that tasks queue for a connection rather than exhaust the
    pool and flood the loop polling it; a Cluster's nodes have pools of their own, and no gate."""
    gate = _gates.get(r)
    if gate is None:
        pool = getattr(r, "connection_pool", None)
        gate = _gates[r] = asyncio.Semaphore(pool.max_connections) if pool is not None else contextlib.nullcontext()
    return gate


# ---------------------------------------------------------------- Lua scripts

class _Script:
    """A Lua script and the SHA-1 that EVALSHA names it by."""

    def __init__(self, source: str) -> None:
        self.source, self.sha = source, hashlib.sha1(source.encode()).hexdigest()


# KEYS: 1 entry hash {v = JSON, t = tokens it cost, w = when its hot window opened, n = its hits in it}, 2 its
# lock, 3 the stream its waiters block on.  ARGV: 1 the caller's token, 2 LOCK_TTL ms, 3 a corrupt value the
# caller found ('' if none).  Returns the value if one was stored meanwhile, 0 if the caller now holds the lock,
# else the lock's ms to live.
_LOCK = _Script("""
local v = redis.pcall('HGET', KEYS[1], 'v')
if type(v) == 'string' and v ~= ARGV[3] then return v end
-- the GET lets a client's retry of this very call keep the lock it took
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) or redis.call('GET', KEYS[2]) == ARGV[1] then
  -- an earlier holder's chunks go; emptied, not deleted, so that the next entry's ID follows the last one's
  if redis.call('TYPE', KEYS[3]).ok == 'stream' then redis.call('XTRIM', KEYS[3], 'MAXLEN', 0)
  else redis.call('DEL', KEYS[3]) end
  return 0
end
return math.max(redis.call('PTTL', KEYS[2]), 1)
""")
# KEYS as _LOCK, 4 the stats shard.  ARGV: 1 token, 2 JSON ('' stores nothing), 3 its tokens, 4 ttl ms, 5 LOCK_TTL
# ms, 6 STATS_TTL ms, 7 a value the caller may replace ('' if none), 8 the caller's clock in ms.  The first answer
# stored wins: the value is stored over no entry, another type or that value only. Releases the lock if it is still
# the caller's, and wakes the waiters if either happened (trimming a stream's chunks). Returns the answer stored
# before, if any; or Redis's refusal of the store (out of memory), as an error, once the lock is released.
_FINISH = _Script("""
local stored, wake, refused = redis.pcall('HGET', KEYS[1], 'v'), false, nil
if ARGV[2] ~= '' and (type(stored) ~= 'string' or stored == ARGV[7]) then
  if type(stored) == 'table' then redis.call('DEL', KEYS[1]) end  -- another type's key
  -- the HSET writes first: a script that has written may write past maxmemory, so out of memory it stores nothing
  local set = redis.pcall('HSET', KEYS[1], 'v', ARGV[2], 't', ARGV[3], 's', ARGV[8])
  if type(set) == 'table' then
    refused = set  -- still released and woken below: the waiters ask again
  else
    redis.call('HDEL', KEYS[1], 'w', 'n')  -- a replaced entry's hot window
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    redis.pcall('HINCRBY', KEYS[4], 'misses', 1)  -- a damaged shard must not cost the release
    redis.pcall('PEXPIRE', KEYS[4], ARGV[6])
    stored, wake = false, true
  end
end
if redis.call('GET', KEYS[2]) == ARGV[1] then wake = redis.call('DEL', KEYS[2]) end
if wake then
  redis.call('XADD', KEYS[3], 'MAXLEN', '1', '*', 'stored', '1')
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
if refused then return refused end
if ARGV[2] ~= '' and type(stored) == 'string' then return stored end
""")
# KEYS: 1 a lock, 2 its stream.  ARGV: 1 the holder's token, 2 LOCK_TTL ms.  Returns 1 if the lock was still the
# holder's; then the chunks it published live as long as the lock.
_RENEW = _Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
""")
# KEYS: 1 a lock, 2 its stream.  ARGV: 1 the holder's token, 2 LOCK_TTL ms, 3 the first chunk's index, 4... the
# chunks' JSON.  Publishes chunks of a streamed answer, with their holder's token, if the lock is still the
# holder's; returns 1 if so.
_PUBLISH = _Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 4, #ARGV do
  redis.call('XADD', KEYS[2], '*', 'i', tostring(tonumber(ARGV[3]) + i - 4), 'c', ARGV[i], 'o', ARGV[1])
end
return redis.call('PEXPIRE', KEYS[2], ARGV[2])
""")
# KEYS: 1 a stats shard, 2... entries of its hash tag.  ARGV: 1 the sender's clock in ms, 2 HOT_WINDOW ms,
# 3 HOT_THRESHOLD, 4 HOT_TTL ms, 5 STATS_TTL ms, 6... each entry's hits since the last flush.  Counts the hits
# and the tokens they saved, and applies each entry's hot window (by the senders' clocks: TIME would need an ACL
# category of its own; a window a clock ahead opened is no window). An entry that expired meanwhile stays gone.
# pcall: a Redis out of memory (noeviction) refuses the bookkeeping, not the flush.
_FLUSH = """
local now, hits, saved = tonumber(ARGV[1]), 0, 0
for i = 2, #KEYS do
  local n, e = tonumber(ARGV[i + 4]), redis.pcall('HMGET', KEYS[i], 't', 'w')
  hits = hits + n
  if not e.err and e[1] then
    saved = saved + (tonumber(e[1]) or 0) * n
    local age, count = now - (tonumber(e[2]) or 0), n
    if age >= 0 and age < tonumber(ARGV[2]) then count = tonumber(redis.pcall('HINCRBY', KEYS[i], 'n', n)) or 0
    else redis.pcall('HSET', KEYS[i], 'w', ARGV[1], 'n', n) end
    if count >= tonumber(ARGV[3]) and redis.call('PTTL', KEYS[i]) < tonumber(ARGV[4]) then
      redis.call('PEXPIRE', KEYS[i], ARGV[4])  -- the string: Lua would write a big number as 1e+17
    end
  end
end
redis.pcall('HINCRBY', KEYS[1], 'hits', hits)
redis.pcall('HINCRBY', KEYS[1], 'tokens_saved', saved)
redis.pcall('PEXPIRE', KEYS[1], ARGV[5])
"""


# ---------------------------------------------------------------- the worker beside the callers

class _Chores:
    """What runs beside the callers, for the sync clients or for one event loop's: the chunks of streams to
    publish, as they come; the renewals of the locks held, every LOCK_TTL / 3; the hit counts, once a second."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self.worker: Any = None  # the thread, or the loop's task, that does them
        self.jobs: collections.deque = collections.deque()  # (function, *arguments), in order
        self.holds: dict[_Req, None] = {}  # the locks held by callers of this process
        self.counts: dict[Any, dict[str, int]] = {}  # client -> entry -> hits not yet sent
        self.flushed = self.wakes_at = time.monotonic()  # when it last sent the counts; when it wakes up next
        self.clients: dict = {}  # an event loop's clients made from REDIS_URL
        self.lock: Any = threading.Lock() if sync else asyncio.Lock()  # stats() and the exit run them too
        self.wake: Any = threading.Event() if sync else asyncio.Event()

    def poke(self, *job: Any, due: float = 0) -> None:
        """Starts the worker if it is not running, and wakes it up for a job, or for a renewal due before it wakes:
        waking a thread while the caller waits on a socket costs the caller the time it takes the GIL back."""
        if job:
            self.jobs.append(job)
        with _starting:  # one worker, however many threads poke at once
            if self.worker is None or not (self.worker.is_alive() if self.sync else not self.worker.done()):
                self.worker = _start(_work, self) if self.sync else asyncio.ensure_future(_awork(self))
        if due < self.wakes_at:
            self.wake.set()

    def nap(self) -> float:
        """Seconds until the next renewal or flush is due."""
        self.wakes_at = min([self.flushed + 1, *(req.renew_at for req in list(self.holds))])
        return max(0.0, self.wakes_at - time.monotonic())

    def due(self) -> list[_Req]:  # (list() copies in one step: callers' threads add and remove holds meanwhile)
        return [req for req in list(self.holds) if req.renew_at <= time.monotonic()]


_SYNC = _Chores(sync=True)
_loop_chores: dict[asyncio.AbstractEventLoop, _Chores] = {}


def _chores(sync: bool) -> _Chores:
    """The sync clients' chores, or the running event loop's."""
    if sync:
        return _SYNC
    loop = asyncio.get_running_loop()
    chores = _loop_chores.get(loop)
    if chores is None or len(_loop_chores) > 1:  # closed loops' go: they would hold their loop and clients alive
        for closed in [old for old in list(_loop_chores) if old.is_closed()]:
            _loop_chores.pop(closed, None)
    if chores is None:
        chores = _loop_chores[loop] = _Chores(sync=False)
    return chores


def _count(req: _Req, hits: int = 1) -> None:
    """Counts hits on the entry, to be sent with the next flush."""
    with _counting:
        tally = req.chores.counts.setdefault(req.r, {})
        tally[req.keys[0]] = tally.get(req.keys[0], 0) + hits
    worker = req.chores.worker  # (a thread runs for good; a loop's task ends when it has nothing left to do)
    if worker is None or not req.chores.sync and worker.done():
        req.chores.poke()


def _hold(req: _Req) -> None:
    req.held, req.renew_at = True, time.monotonic() + req.s.lock_ms / 3000
    req.chores.holds[req] = None
    req.chores.poke(due=req.renew_at)


def _batches(counts: dict[str, int]) -> list[tuple[list[str], list]]:
    """The flush of one client's hit counts: the keys and arguments of one _FLUSH per hash tag."""
    s, now = _settings(None, DEFAULT_TTL, LOCK_TTL, HOT_THRESHOLD, HOT_TTL, HOT_WINDOW, STATS_TTL, MAX_WAIT,
                       RETRY_AFTER), int(time.time() * 1000)
    batches: dict[str, tuple[list[str], list]] = {}
    for entry, hits in counts.items():
        tag = entry[:entry.index("}") + 1]
        keys, args = batches.setdefault(tag, ([tag + "stats"], [now, s.window_ms, s.hot_threshold, s.hot_ms,
                                                                 s.stats_ms]))
        keys.append(entry)
        args.append(hits)
    return list(batches.values())


def _work(chores: _Chores) -> None:
    while True:
        chores.wake.wait(chores.nap())
        chores.wake.clear()
        try:
            _run_chores(chores)
        except Exception:  # the worker must outlive anything: a bad setting read at a flush, say
            log.exception("llm cache: the background worker failed")


def _run_chores(chores: _Chores, flush: bool = False) -> None:
    with chores.lock:
        while chores.jobs:
            job, *args = chores.jobs.popleft()
            job(*args)
        for req in chores.due():
            _renew(req)
        if flush or time.monotonic() >= chores.flushed + 1:
            _flush(chores)


def _renew(req: _Req) -> None:
    # python-redis-lock's auto_renewal: the holder's lock outlives any call, and dies with the holder's process.
    # Not a stream's whose caller has held a chunk for MAX_WAIT, though (its waiters have given up by then): the
    # iterator may be unreachable but alive, in a traceback, say
    req.renew_at = time.monotonic() + req.s.lock_ms / 3000
    try:
        if req.paused is not None and time.monotonic() - req.paused > MAX_WAIT or not _script(
                req.r, _RENEW, req.keys[1:3], req.token, req.s.lock_ms):
            req.chores.holds.pop(req, None)  # not the holder any more: the first answer stored wins
    except _ERRORS:
        pass  # Redis is away; if it stays away the lock expires, which costs a duplicate call at most


def _publish(req: _Req) -> None:
    """Publishes a leader's chunks not yet sent, in one round trip; none after a failure (then its followers
    read the entry)."""
    batch = req.texts[req.sent:]
    if batch and req.sent >= 0:
        try:
            sent = _script(req.r, _PUBLISH, req.keys[1:3], req.token, req.s.lock_ms, req.sent, *batch)
        except _ERRORS as e:
            _failed(req.r, e)
            sent = 0
        req.sent = req.sent + len(batch) if sent else -1


def _flush(chores: _Chores) -> None:
    with _counting:
        counts, chores.counts, chores.flushed = chores.counts, {}, time.monotonic()
    for r, hits in counts.items():
        if _up(r):  # else they are dropped: a Redis that is down would cost the worker a timeout a second
            try:
                pipe = r.pipeline(transaction=False)
                for keys, args in _batches(hits):
                    pipe.execute_command("EVAL", _FLUSH, len(keys), *keys, *args)
                pipe.execute()
            except _ERRORS as e:
                _unsent(chores, r, hits, e)


async def _awork(chores: _Chores) -> None:
    try:
        while chores.jobs or chores.holds or chores.counts:  # then it ends, so that its loop may close
            try:
                await asyncio.wait_for(chores.wake.wait(), chores.nap())
            except asyncio.TimeoutError:
                pass
            chores.wake.clear()
            await _arun_chores(chores)
    except asyncio.CancelledError:  # its loop is closing (asyncio.run's end): send what is left first
        await _arun_chores(chores, flush=True)
        raise


async def _arun_chores(chores: _Chores, flush: bool = False) -> None:
    async with chores.lock:
        while chores.jobs:
            job, *args = chores.jobs.popleft()
            await job(*args)
        for req in chores.due():
            await _arenew(req)
        if flush or time.monotonic() >= chores.flushed + 1:
            await _aflush(chores)


async def _arenew(req: _Req) -> None:
    req.renew_at = time.monotonic() + req.s.lock_ms / 3000
    try:
        if req.paused is not None and time.monotonic() - req.paused > MAX_WAIT or not await _ascript(
                req.r, _RENEW, req.keys[1:3], req.token, req.s.lock_ms):
            req.chores.holds.pop(req, None)
    except _ERRORS:
        pass


async def _apublish(req: _Req) -> None:
    batch = req.texts[req.sent:]
    if batch and req.sent >= 0:
        try:
            sent = await _ascript(req.r, _PUBLISH, req.keys[1:3], req.token, req.s.lock_ms, req.sent, *batch)
        except _ERRORS as e:
            _failed(req.r, e)
            sent = 0
        req.sent = req.sent + len(batch) if sent else -1


async def _aflush(chores: _Chores) -> None:
    with _counting:
        counts, chores.counts, chores.flushed = chores.counts, {}, time.monotonic()
    for r, hits in counts.items():
        if _up(r):
            try:
                pipe = r.pipeline(transaction=False)
                for keys, args in _batches(hits):
                    pipe.execute_command("EVAL", _FLUSH, len(keys), *keys, *args)
                async with _gate(r):
                    await pipe.execute()
            except _ERRORS as e:
                _unsent(chores, r, hits, e)


def _unsent(chores: _Chores, r: Any, hits: dict[str, int], error: Exception) -> None:
    """Hit counts a flush could not send: kept for the next one if Redis had no connection for it (the pool busy,
    maxclients), else dropped."""
    if _busy(error):
        with _counting:
            tally = chores.counts.setdefault(r, {})
            for entry, n in hits.items():
                tally[entry] = tally.get(entry, 0) + n
    else:
        _failed(r, error)


def _at_exit() -> None:
    _run_chores(_SYNC, flush=True)


def _after_fork() -> None:  # a child inherits the parent's state, but not the threads that serve it
    global _loading, _counting, _starting
    _loading, _counting, _starting = threading.Lock(), threading.Lock(), threading.Lock()
    registry: Any = sys.modules.get("tiktoken.registry")
    if registry is not None and math.inf in _loads.values():  # the parent's loading thread holds tiktoken's lock
        registry._lock = threading.RLock()
    _SYNC.__dict__.update(_Chores(sync=True).__dict__)  # the parent sends its own counts, renews its own locks
    _leading.set(())  # the forking thread's streams are the parent's to lead
    for state in (_flights, _loop_chores, _wait_slots, _gates, _loads):
        state.clear()


os.register_at_fork(after_in_child=_after_fork)
# threading's exit hook runs at the interpreter's exit and at a multiprocessing child's, which ends in os._exit
getattr(threading, "_register_atexit", atexit.register)(_at_exit)


# ---------------------------------------------------------------- get_or_set: the sync path

def get_or_set(messages: list[dict], model: str, call_fn: Callable[[], Any], ttl: float | None = None, *,
               client: redis.Redis | redis.RedisCluster | None = None, params: dict | None = None,
               response_model: type | None = None) -> Any:
    """call_fn()'s answer to this request, as JSON gives it back (or as response_model, a pydantic model); the model
    is called only on a miss. If call_fn returns an iterator (a stream), the answer is an iterator of its chunks."""
    if inspect.iscoroutinefunction(call_fn):
        raise TypeError(f"call_fn is a coroutine function ({call_fn.__qualname__}): await aget_or_set for it")
    req = _Req(_redis(client, sync=True), _keys(messages, model, params, response_model), call_fn, ttl, _SYNC,
               messages, model)
    req.shape = response_model
    value = _get(req)
    if value is _MISS:
        value = _shaped(req, _single_flight(req))
    return (chunk for chunk in value) if isinstance(value, _Stored) else value


def _get(req: _Req) -> Any:
    """The stored answer, counted as a hit; _MISS if there is none, or Redis is down."""
    if req.r is None or _down_until.get(req.r, 0) > time.monotonic():
        return _MISS
    read = ("HGET", req.keys[0], "v") if req.max_age is None else ("HMGET", req.keys[0], "v", "s")
    try:
        try:
            data = req.r.execute_command(*read, NEVER_DECODE=True)
        except redis.ConnectionError as e:
            if not _busy(e):
                raise
            data = _command(req.r, *read)  # no connection to be had now (a busy pool, maxclients): wait for one
    except _ERRORS as e:
        _failed(req.r, e)
        return _MISS
    return _hit(req, data if req.max_age is None else _fresh(req, *data))


def _fresh(req: _Req, data: bytes | None, stored_at: bytes | None) -> bytes | None:
    """The entry, if stored within the caller's max-age; else None, and the caller's store may replace it."""
    if data is not None and req.max_age is not None and int(stored_at or 0) < time.time() * 1000 - req.max_age:
        req.corrupt, data = data, None
    return data


def _hit(req: _Req, data: bytes | None) -> Any:
    """A stored answer, counted as a hit; _MISS if there is none, or it is corrupt (the store may replace it)."""
    if data is None:
        return _MISS
    try:  # an entry of JSON text, or a stream's or an HTTP answer's, which start with a control character
        value = json.loads(data) if data[:1] > b"\x1f" else _decoded(data)
    except (ValueError, RecursionError):  # not JSON, or not UTF-8
        req.corrupt = data
        return _MISS
    if req.shape is not None and not isinstance(value, (_Stored, req.shape)):
        try:
            value = req.shape.model_validate(value, **_by_name(req.shape))
        except ValueError:  # pydantic's ValidationError: an answer of an older shape, say
            _invalid(req.shape)
            req.corrupt = data
            return _MISS
    _count(req)
    return value


@functools.cache  # once per model
def _invalid(shape: type) -> None:
    log.warning("llm cache: entries that are no valid %s count as misses and are replaced", shape.__name__)


def _shaped(req: _Req, value: Any) -> Any:
    """The answer as the response_model the caller named, if it named one (a hit's is one already)."""
    if req.shape is None or isinstance(value, (req.shape, Iterator, AsyncIterator, _Stored)):
        return value
    return req.shape.model_validate(value, **_by_name(req.shape))


@functools.cache
def _by_name(shape: Any) -> dict:
    """What makes pydantic read an answer's field names, as it was stored, where a field has an alias: by_name, from
    pydantic 2.11 on (before, a model with aliases reads them only, and its answers are not cached)."""
    return {"by_name": True} if "by_name" in inspect.signature(shape.model_validate).parameters else {}


def _command(r: Any, *args: Any) -> Any:
    """One round trip, its reply undecoded. With no connection to be had yet, it waits, up to LOCK_TTL."""
    give_up = time.monotonic() + LOCK_TTL
    while True:
        try:
            return r.execute_command(*args, NEVER_DECODE=True)
        except redis.ConnectionError as e:
            if not _busy(e) or time.monotonic() > give_up:
                raise
        time.sleep(0.01)  # (no gate, as tasks have: a threading.Semaphore would cost every hit 15 µs)


def _script(r: Any, script: _Script, keys: list[str], *args: Any) -> Any:
    try:  # EVALSHA straight from the client: through redis-py's Script a hit measured 6-10% slower
        return _command(r, "EVALSHA", script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:  # a new or flushed server: EVAL runs the script and caches it
        return _command(r, "EVAL", script.source, len(keys), *keys, *args)


def _single_flight(req: _Req) -> Any:
    """Go's singleflight: one caller per process and request goes on to Redis's lock and the model; the others
    share its outcome (its answer, or its exception: the same object) and wait as long as it does."""
    key, mine = (id(req.r), "threads", req.keys[0], req.max_age), concurrent.futures.Future[Any]()
    mine.leader = threading.current_thread()  # type: ignore[attr-defined]
    while (flight := _flights.setdefault(key, mine)) is not mine:  # atomic: one dict operation
        if _leads(req) or not _wait(flight):  # call_fn asked for its own request: it must not wait for itself
            return _trip(req, wait=False)[0]
        data = flight.result()  # the leader's exception raised again, if it got one
        if data is not None:  # else no answer to share (a stream's): the next in line goes on
            value = _hit(req, data)
            return _decoded(data) if value is _MISS else value  # not its response_model: _shaped says why
    try:
        value, data = _trip(req, wait=True)
    except BaseException as e:
        _flights.pop(key, None)
        # an HTTP error answer may be the caller's own (its API key, its organization): the others ask themselves
        mine.set_exception(e) if isinstance(e, Exception) and not isinstance(e, _Refused) else mine.set_result(None)
        raise
    _flights.pop(key, None)
    mine.set_result(data)
    return value


def _leads(req: _Req) -> bool:
    """Whether the caller, or the task or thread whose context it runs in, leads this request."""
    return any(mark.leading and mark.keys[0] == req.keys[0] for mark in _leading.get())


def _wait(flight: concurrent.futures.Future) -> bool:
    """Waits for the leader's outcome. False at once if the leader waits for this thread: its call_fn asked for its
    own request from a thread it then waits on (executor.submit(...).result(), Thread.join), which carries none of
    its context."""
    pause = 0.05
    while not _waits_for_me(flight.leader):  # type: ignore[attr-defined]
        if concurrent.futures.wait([flight], timeout=pause).done:
            return True
        pause = min(pause * 2, 2)  # a scan of the leader's frames costs CPU: less often, the longer it runs
    return False


def _waits_for_me(leader: threading.Thread) -> bool:
    """Whether the leader's call_fn holds this thread, or the future of the pool's work item it runs (to join it, wait
    on it, read its queue): what the frames it runs in hold, or hold in a collection. Not its caller's frames: a
    leader that merely keeps its followers' threads or futures there is waited for."""
    frames, mine = sys._current_frames(), list[Any]([threading.current_thread()])
    frame = frames.get(threading.get_ident())
    while frame is not None:
        mine.append(getattr(frame.f_locals.get("self"), "future", None))
        frame = frame.f_back
    ids, frame = {id(thing) for thing in mine if thing is not None}, frames.get(leader.ident or 0)
    while frame is not None and frame.f_code.co_filename != _waits_for_me.__code__.co_filename:  # down to cache.py
        for held in frame.f_locals.values():
            if id(held) in ids or isinstance(held, (list, set, tuple)) and any(id(x) in ids for x in held):
                return True
        frame = frame.f_back
    return False


def _trip(req: _Req, wait: bool) -> tuple[Any, bytes | None]:
    """The answer, and its JSON if it may be shared: from Redis, if it was stored meanwhile, or once the lock's
    holder has stored it; else from call_fn, holding the lock if Redis gave it."""
    if _up(req.r):
        try:
            value, data = _lookup(req, wait)
            if _down_until.pop(req.r, None):
                log.warning("llm cache: Redis answers again, caching resumed")
            if value is not _MISS:
                return value, data
        except _ERRORS as e:
            _failed(req.r, e)
            # a reply lost after the server ran the script may have given the caller the lock all the same: then
            # it renews, stores and releases like any holder (the owner check makes that safe)
            req.held = isinstance(e, redis.TimeoutError)
    return _call(req)


def _lookup(req: _Req, wait: bool) -> tuple[Any, bytes | None]:
    """What Redis has: the answer, counted as a hit, and its JSON; or _MISS once the caller should call the model,
    holding the lock if it took it; or, while the holder streams, its chunks, followed live."""
    req.token, deadline, waiter = secrets.token_hex(8), time.monotonic() + MAX_WAIT, None
    try:
        while True:
            reply = _script(req.r, _LOCK, req.keys[:3], req.token, req.s.lock_ms, req.corrupt)
            if not isinstance(reply, int):
                value = _hit(req, reply)
                if value is not _MISS:
                    return value, reply
                continue  # corrupt: the next lookup takes the lock over it
            req.held = reply == 0
            if req.held or not wait or time.monotonic() >= deadline or _leads(req):
                return _MISS, None
            waiter = waiter or _Waiter(req)
            if chunks := waiter.wait(min(reply, (deadline - time.monotonic()) * 1000)):
                follow = _primed(_follow(req, waiter, chunks))
                waiter = None  # the follower's now
                return follow, None
    except BaseException as e:  # interrupted, maybe as the server gave it the lock: let go if so (owner-checked)
        if not isinstance(e, _ERRORS):
            req.chores.poke(_finish, req, b"", 0)
        raise
    finally:
        if waiter is not None:
            waiter.close()


def _call(req: _Req) -> tuple[Any, bytes | None]:
    """call_fn's answer and its JSON: stored, and the lock released, if the caller holds it. The first answer
    stored wins: a holder that lost its lock returns the one stored before its own."""
    if req.held:
        _hold(req)
    _mark(req)
    try:
        result = req.call_fn()
        req.outcome = "miss" if req.token and _up(req.r) else "bypass"
        if isinstance(result, Iterator):  # a stream: the caller leads it until it ends
            return _primed(_relay(req, result)), None
        req.leading = False
        value, data = _entry(result)
    except BaseException:
        req.leading = False
        _release(req)  # at once, so that the next caller need not wait
        raise
    tokens = _tokens(req.messages, req.model, value)
    if req.held and not _up(req.r):  # Redis failed just now: the caller must not wait out another timeout
        req.outcome = "bypass"
        req.chores.poke(_finish, req, data, tokens)
    elif req.token and _up(req.r) and (stored := _finish(req, data, tokens)) is not None:
        return _won(req, stored, value, data)
    return value, data


def _won(req: _Req, stored: bytes, value: Any, data: bytes) -> tuple[Any, bytes]:
    """The answer stored before the caller's, which wins; the caller's own if that one is corrupt, or is no valid
    response_model."""
    try:
        return _shaped(req, _decoded(stored)), stored
    except (ValueError, RecursionError):  # (pydantic's ValidationError is a ValueError)
        return value, data


def _mark(req: _Req) -> None:
    """Marks the caller as leading req, until req.leading is cleared, so that neither it nor a task or thread that
    inherits its context waits for it."""
    req.leading = True
    _leading.set(tuple(mark for mark in _leading.get() if mark.leading) + (req,))


def _release(req: _Req, data: bytes = b"", tokens: int = 0) -> None:
    """Stores data, if any, lets the lock go and wakes the waiters: in the background if Redis failed just now."""
    if not (req.held or data and req.token):
        return
    if _up(req.r):
        _finish(req, data, tokens)
    else:
        req.chores.poke(_finish, req, data, tokens)


def _finish(req: _Req, data: bytes, tokens: int) -> bytes | None:
    """Stores data (b"" stores nothing), releases the lock and wakes the waiters, in one round trip; returns the
    answer stored before, if there was one."""
    req.chores.holds.pop(req, None)
    for again in (True, False):
        try:
            return _script(req.r, _FINISH, req.keys, *_finish_args(req, data, tokens))
        except _ERRORS as e:
            if _gives_up(req, e, again):
                return None
    return None


def _finish_args(req: _Req, data: bytes, tokens: int) -> list:
    return [req.token, data, tokens, req.s.ttl_ms, req.s.lock_ms, req.s.stats_ms, req.corrupt, int(time.time() * 1000)]


def _gives_up(req: _Req, error: Exception, again: bool) -> bool:
    """Whether a store that failed is given up (then the answer is not stored). A connection dropped during the
    call (a restart, an idle timeout) is tried once more, as a client's own retry would: the owner check makes a
    repeat harmless."""
    if again and isinstance(error, redis.ConnectionError) and not _busy(error):
        return False
    _failed(req.r, error)
    req.outcome = "bypass"
    return True


def _primed(stream: Iterator) -> Iterator:
    next(stream)  # to its first yield: from there, closing it or dropping it unread runs its finally block
    return stream


def _relay(req: _Req, source: Iterator) -> Iterator:
    """The model's stream, relayed as it comes: each chunk to the caller, and through the worker to the followers
    while the caller holds the lock. Stored whole at the end, if it ended complete; else the lock is let go and the
    model's stream closed."""
    chunks: list = []
    publish, entry, tokens = req.held and _up(req.r), b"", 0
    try:
        req.paused = time.monotonic()  # since when the caller holds a chunk: renewals stop after MAX_WAIT
        yield None
        for chunk in source:
            value = _taken(req, chunks, chunk)
            if publish:
                req.chores.poke(_publish, req)
            req.paused = time.monotonic()
            yield value
            req.paused = None
        entry, tokens = _stream_entry(req, chunks)
    except Exception:  # the model's stream broke: stored all the same if its final event had come
        entry, tokens = _stream_entry(req, chunks, exhausted=False)
        raise
    except GeneratorExit:  # closed, or dropped: maybe by the garbage collector, inside a lock the release needs
        ended, tokens = _stream_entry(req, chunks, exhausted=False)
        if req.held or ended and req.token:
            req.chores.poke(_finish, req, ended, tokens)
            req.held = False
        raise
    finally:  # (publishes still on their way after the store are refused: the followers read the entry)
        req.leading = False
        _release(req, entry, tokens)
        close = getattr(source, "close", None)
        if close is not None:
            close()  # the model's stream: stopped early, its connection goes back to its pool


def _taken(req: _Req, chunks: list, chunk: Any) -> Any:
    """A leader's chunk, as JSON gives it back; kept for the entry, and for the worker to publish."""
    try:
        value, text = _json(chunk, "call_fn's stream gave")
    except TypeError:
        chunks.clear()  # nothing of a stream that gave a chunk that is not JSON is stored
        raise
    chunks.append(value)
    req.texts.append(text)
    return value


def _stream_entry(req: _Req, chunks: list, exhausted: bool = True) -> tuple[bytes, int]:
    """A stream's entry, RS, the holder's token and the JSON list of its chunks, and the tokens it cost; b"" if it
    ended incomplete, so that it is not stored. One closed or broken before it was exhausted is complete once its
    final event had come (its caller stopped at the finish_reason, say): what came is the answer."""
    if not _complete(chunks, req.sse, exhausted):
        return b"", 0
    entry = f"{_RS}{req.token}[{','.join(req.texts)}]".encode()
    return entry, _tokens(req.messages, req.model, _events(chunks) if req.sse else chunks)


def _follow(req: _Req, waiter: _Waiter, chunks: list) -> Iterator:
    """A streamed answer's chunks as the lock's holder publishes them, then the rest from its entry; a hit. Raises
    StreamInterrupted if the holder stops after some were handed out; with none handed out, it asks again."""
    n, holder, entry = 0, b"", None
    try:
        yield None
        while True:
            for index, data, owner in chunks:
                if n and owner != holder:  # another holder's chunks: the last one died
                    _interrupted()
                if index == n:  # else a repeat, from a publish retried
                    yield json.loads(data)
                    n, holder = n + 1, owner
            chunks = [] if waiter.released else waiter.wait(req.s.lock_ms)
            if not chunks:
                waiter.released = False
                entry, lock = _peek(req, n)
                if entry is not None or lock is None or n and lock != holder:
                    break  # stored, or let go
    finally:
        waiter.close()
    rest = _ending(req, entry, n, holder)
    yield from _again(req) if rest is None else rest


def _peek(req: _Req, n: int) -> tuple[bytes | None, bytes | None]:
    """The entry and the lock's token; once chunks were handed out, read past errors for up to LOCK_TTL, so that a
    short stall, which another thread may have taken for an outage, doesn't break the stream."""
    give_up = time.monotonic() + (req.s.lock_ms / 1000 if n else 0)
    while True:
        try:  # the lock first: the store and the release are one script, so an entry read after the lock is gone
            lock = _command(req.r, "GET", req.keys[1])  # holds whatever was stored with the release
            return _command(req.r, "HGET", req.keys[0], "v"), lock
        except _ERRORS:
            if time.monotonic() >= give_up:
                return None, None
        time.sleep(0.05)


def _ending(req: _Req, entry: bytes | None, n: int, holder: bytes) -> list | None:
    """A followed stream's chunks from the n-th on, from its entry, counted as a hit; None if the stream broke off
    before any was handed out, so that the follower asks again. StreamInterrupted if it broke off later."""
    try:
        stored = _decoded(entry) if entry is not None else None
    except (ValueError, RecursionError):
        stored = None
    if isinstance(stored, _Stored) and (not n or stored.token == holder):
        _count(req)
        return stored[n:]
    if n:
        _interrupted()
    return None


def _again(req: _Req) -> Iterator:
    value = _trip(req, wait=True)[0]
    if not isinstance(value, (Iterator, list)):
        raise TypeError(f"call_fn returned a stream for this request before, and now a {type(value).__name__}")
    yield from value


def _interrupted() -> Any:
    raise StreamInterrupted("the caller streaming this answer from the model failed or stopped, after some of its "
                            "chunks were handed out here; ask again for the whole answer")


class _Waiter:
    """A waiter's sleep until the lock's holder stores, publishes a chunk or lets go: on a connection of its own, so
    that waiters never hold one of the pool's, yet no more of them than the pool may open. Past that, or if the
    server refuses one (maxclients), it polls every 50 ms."""

    def __init__(self, req: _Req) -> None:
        self.req, self.conn, self.seen, self.released, self.timeout = req, None, b"0-0", False, None
        owner, pool = _pool(req.r, req.keys[2])
        self.slots = _wait_slots.setdefault(owner, threading.BoundedSemaphore(pool.max_connections))
        if self.slots.acquire(blocking=False):
            self.conn = pool.connection_class(**pool.connection_kwargs)
            self.timeout = self.conn.socket_timeout  # a block lasts up to this, and its reply may take as long again
            self.conn.socket_timeout = 2 * self.timeout if self.timeout else None

    def xread(self, ms: float) -> tuple:
        return ("XREAD", "BLOCK", max(1, int(min(ms, (self.timeout or 1) * 1000))), "STREAMS", self.req.keys[2],
                self.seen)

    def chunks(self, reply: Any) -> list[tuple[int, bytes, bytes]]:
        """The chunks an XREAD read: (index, JSON, the holder's token). Notes whether the lock was let go."""
        entries = (next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]) if reply else []
        chunks = []
        for entry, fields in entries:  # RESP3 replies a map, RESP2 a list of [stream, entries]
            self.seen = entry
            if fields[:1] == [b"i"]:
                chunks.append((int(fields[1]), fields[3], fields[5]))
        self.released = len(chunks) < len(entries)
        return chunks

    def wait(self, ms: float) -> list[tuple[int, bytes, bytes]]:
        """The chunks published since the last wait; [] after a wake-up, or ms."""
        if self.conn is None:
            time.sleep(min(ms, 50) / 1000)
            return []
        try:
            self.conn.send_command(*self.xread(ms))
            return self.chunks(self.conn.read_response(disable_decoding=True))
        except _ERRORS as e:  # the next wait connects again
            self.conn.disconnect()
            if not isinstance(e, redis.TimeoutError):  # dropped, refused (maxclients) or an error reply: poll first
                time.sleep(min(ms, 50) / 1000)
            return []

    def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            self.slots.release()  # first: a second cancellation may interrupt the close
            conn.disconnect()


def _pool(r: Any, key: str) -> tuple[Any, Any]:
    """Whose waiters' connections are counted, and what makes them: connection_class, _kwargs, max_connections."""
    if isinstance(r, redis.RedisCluster):
        pool = r.get_node_from_key(key).redis_connection.connection_pool
        return pool, pool
    if isinstance(r, redis.asyncio.RedisCluster):  # a node makes its own connections, and takes no weak reference
        return r, r.get_node_from_key(key)
    return r.connection_pool, r.connection_pool


# ---------------------------------------------------------------- aget_or_set: the async twin

async def aget_or_set(messages: list[dict], model: str, call_fn: Callable[[], Any], ttl: float | None = None, *,
                      client: redis.asyncio.Redis | redis.asyncio.RedisCluster | None = None,
                      params: dict | None = None, response_model: type | None = None) -> Any:
    """get_or_set for asyncio: call_fn may return an awaitable, and no wait blocks the event loop. A stream
    (an iterator or async iterator, such as AsyncStream) is answered with an async iterator of its chunks."""
    req = _Req(_redis(client, sync=False), _keys(messages, model, params, response_model), call_fn, ttl,
               _chores(sync=False), messages, model)
    req.shape = response_model
    value = await _aget(req)
    if value is _MISS:
        value = _shaped(req, await _asingle_flight(req))
    return _areplay(value) if isinstance(value, _Stored) else value


async def _aget(req: _Req) -> Any:
    if req.r is None or _down_until.get(req.r, 0) > time.monotonic():
        return _MISS
    try:
        if req.max_age is None:
            data = await _acommand(req.r, "HGET", req.keys[0], "v")
        else:
            data = _fresh(req, *await _acommand(req.r, "HMGET", req.keys[0], "v", "s"))
    except _ERRORS as e:
        _failed(req.r, e)
        return _MISS
    return _hit(req, data)


async def _acommand(r: Any, *args: Any) -> Any:
    gate, give_up = _gate(r), time.monotonic() + LOCK_TTL
    while True:
        try:
            async with gate:
                return await r.execute_command(*args, NEVER_DECODE=True)
        except redis.ConnectionError as e:
            if not _busy(e) or time.monotonic() > give_up:
                raise
        await asyncio.sleep(0.01)


async def _ascript(r: Any, script: _Script, keys: list[str], *args: Any) -> Any:
    try:
        return await _acommand(r, "EVALSHA", script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        return await _acommand(r, "EVAL", script.source, len(keys), *keys, *args)


async def _asingle_flight(req: _Req) -> Any:
    loop = asyncio.get_running_loop()
    key, mine = (id(req.r), loop, req.keys[0], req.max_age), loop.create_future()
    while (flight := _flights.setdefault(key, mine)) is not mine:
        if _leads(req):  # a child task inherits its context, and so its mark
            return (await _atrip(req, wait=False))[0]
        data = await asyncio.shield(flight)  # shielded: a follower cancelled doesn't cancel the others
        if data is not None:
            value = _hit(req, data)
            return _decoded(data) if value is _MISS else value
    try:
        value, data = await _atrip(req, wait=True)
    except BaseException as e:
        _flights.pop(key, None)
        if isinstance(e, Exception) and not isinstance(e, _Refused):
            mine.set_exception(e)
            mine.exception()  # taken as read: asyncio would log it, when no follower did
        else:
            mine.set_result(None)
        raise
    _flights.pop(key, None)
    mine.set_result(data)
    return value


async def _atrip(req: _Req, wait: bool) -> tuple[Any, bytes | None]:
    if _up(req.r):
        try:
            value, data = await _alookup(req, wait)
            if _down_until.pop(req.r, None):
                log.warning("llm cache: Redis answers again, caching resumed")
            if value is not _MISS:
                return value, data
        except _ERRORS as e:
            _failed(req.r, e)
            req.held = isinstance(e, redis.TimeoutError)
    return await _acall(req)


async def _alookup(req: _Req, wait: bool) -> tuple[Any, bytes | None]:
    req.token, deadline, waiter = secrets.token_hex(8), time.monotonic() + MAX_WAIT, None
    try:
        while True:
            reply = await _ascript(req.r, _LOCK, req.keys[:3], req.token, req.s.lock_ms, req.corrupt)
            if not isinstance(reply, int):
                value = _hit(req, reply)
                if value is not _MISS:
                    return value, reply
                continue
            req.held = reply == 0
            if req.held or not wait or time.monotonic() >= deadline or _leads(req):
                return _MISS, None
            waiter = waiter or _AWaiter(req)
            if chunks := await waiter.wait(min(reply, (deadline - time.monotonic()) * 1000)):
                follow = await _aprimed(_afollow(req, waiter, chunks))
                waiter = None
                return follow, None
    except BaseException as e:  # a cancelled task can't await the release: the worker lets go
        if not isinstance(e, _ERRORS):
            req.chores.poke(_afinish, req, b"", 0)
        raise
    finally:
        if waiter is not None:
            await waiter.close()


async def _acall(req: _Req) -> tuple[Any, bytes | None]:
    if req.held:
        _hold(req)
    _mark(req)
    try:
        result = req.call_fn()
        if inspect.isawaitable(result):
            result = await result
        req.outcome = "miss" if req.token and _up(req.r) else "bypass"
        if isinstance(result, (Iterator, AsyncIterator)):
            return await _aprimed(_arelay(req, result)), None
        req.leading = False
        value, data = _entry(result)
    except asyncio.CancelledError:  # a cancelled task can't await the release: the worker lets go, at once
        req.leading = False
        if req.held:
            req.chores.poke(_afinish, req, b"", 0)
        raise
    except BaseException:
        req.leading = False
        await _arelease(req)  # before the error reaches the caller, so that the next caller need not wait
        raise
    tokens = _tokens(req.messages, req.model, value)
    if req.held and not _up(req.r):
        req.outcome = "bypass"
        req.chores.poke(_afinish, req, data, tokens)
    elif req.token and _up(req.r) and (stored := await _asettled(_afinish(req, data, tokens))) is not None:
        return _won(req, stored, value, data)
    return value, data


async def _asettled(finishing: Any) -> Any:
    """A store and release that a cancellation can't stop: in a task of its own."""
    task = asyncio.ensure_future(finishing)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return await asyncio.shield(task)


async def _arelease(req: _Req, data: bytes = b"", tokens: int = 0) -> None:
    if not (req.held or data and req.token):
        return
    if _up(req.r):
        await _afinish(req, data, tokens)
    else:
        req.chores.poke(_afinish, req, data, tokens)


async def _afinish(req: _Req, data: bytes, tokens: int) -> bytes | None:
    req.chores.holds.pop(req, None)
    for again in (True, False):
        try:
            return await _ascript(req.r, _FINISH, req.keys, *_finish_args(req, data, tokens))
        except _ERRORS as e:
            if _gives_up(req, e, again):
                return None
    return None


async def _aprimed(stream: Any) -> Any:
    await stream.__anext__()
    return stream


async def _areplay(chunks: list) -> Any:
    for chunk in chunks:
        yield chunk


async def _arelay(req: _Req, source: Iterator | AsyncIterator) -> Any:
    chunks: list = []
    publish, entry, tokens = req.held and _up(req.r), b"", 0
    try:
        req.paused = time.monotonic()
        yield None
        while (chunk := await anext(source, _MISS) if isinstance(source, AsyncIterator) else next(source, _MISS)
               ) is not _MISS:
            value = _taken(req, chunks, chunk)
            if publish:
                req.chores.poke(_apublish, req)
            req.paused = time.monotonic()
            yield value
            req.paused = None
        entry, tokens = _stream_entry(req, chunks)
    except Exception:
        entry, tokens = _stream_entry(req, chunks, exhausted=False)
        raise
    except asyncio.CancelledError:  # a cancelled task can't await the release: the worker stores or lets go
        ended, tokens = _stream_entry(req, chunks, exhausted=False)
        if req.held or ended and req.token:
            req.chores.poke(_afinish, req, ended, tokens)
            req.held = False
        raise
    except GeneratorExit:  # closed, or dropped (asyncio closes it in a task, or at asyncio.run's end): awaited below
        entry, tokens = _stream_entry(req, chunks, exhausted=False)
        raise
    finally:
        req.leading = False
        await _arelease(req, entry, tokens)
        close = getattr(source, "aclose", None) or getattr(source, "close", None)
        if close is not None and inspect.isawaitable(closing := close()):
            await closing


async def _afollow(req: _Req, waiter: _AWaiter, chunks: list) -> Any:
    n, holder, entry = 0, b"", None
    try:
        yield None
        while True:
            for index, data, owner in chunks:
                if n and owner != holder:
                    _interrupted()
                if index == n:
                    yield json.loads(data)
                    n, holder = n + 1, owner
            chunks = [] if waiter.released else await waiter.wait(req.s.lock_ms)
            if not chunks:
                waiter.released = False
                entry, lock = await _apeek(req, n)
                if entry is not None or lock is None or n and lock != holder:
                    break
    finally:
        await waiter.close()
    rest: Any = _ending(req, entry, n, holder)
    if rest is None:
        rest = (await _atrip(req, wait=True))[0]
        if not isinstance(rest, (AsyncIterator, list)):
            raise TypeError(f"call_fn returned a stream for this request before, and now a {type(rest).__name__}")
    async for chunk in _areplay(rest) if isinstance(rest, list) else rest:
        yield chunk


async def _apeek(req: _Req, n: int) -> tuple[bytes | None, bytes | None]:
    give_up = time.monotonic() + (req.s.lock_ms / 1000 if n else 0)
    while True:
        try:
            lock = await _acommand(req.r, "GET", req.keys[1])
            return await _acommand(req.r, "HGET", req.keys[0], "v"), lock
        except _ERRORS:
            if time.monotonic() >= give_up:
                return None, None
        await asyncio.sleep(0.05)


class _AWaiter(_Waiter):
    async def wait(self, ms: float) -> list[tuple[int, bytes, bytes]]:  # type: ignore[override]
        if self.conn is None:
            await asyncio.sleep(min(ms, 50) / 1000)
            return []
        try:
            await self.conn.send_command(*self.xread(ms))
            return self.chunks(await self.conn.read_response(disable_decoding=True))
        except _ERRORS as e:
            await self.conn.disconnect()
            if not isinstance(e, redis.TimeoutError):
                await asyncio.sleep(min(ms, 50) / 1000)
            return []

    async def close(self) -> None:  # type: ignore[override]
        if self.conn is not None:
            conn, self.conn = self.conn, None
            self.slots.release()
            await conn.disconnect()


# ---------------------------------------------------------------- the HTTP layer: OpenAI(http_client=http_client())

def http_client(*, client: Any = None, ttl: float | None = None, library: Any = None, **kwargs: Any) -> Any:
    """An httpx2 Client (httpx's, where httpx2 is not installed or library says so) whose transport answers LLM calls
    from Redis: OpenAI(http_client=cache.http_client()). The other keyword arguments go to httpx."""
    lib = library or _httpx()
    inner = {name: kwargs.pop(name) for name in _TRANSPORT_ARGS if name in kwargs}  # a transport ignores the client's
    return lib.Client(transport=Transport(lib.HTTPTransport(**inner), client=client, ttl=ttl), **kwargs)


def async_http_client(*, client: Any = None, ttl: float | None = None, library: Any = None, **kwargs: Any) -> Any:
    """http_client for asyncio: an AsyncClient, for AsyncOpenAI(http_client=...) and the like."""
    lib = library or _httpx()
    inner = {name: kwargs.pop(name) for name in _TRANSPORT_ARGS if name in kwargs}
    return lib.AsyncClient(transport=AsyncTransport(lib.AsyncHTTPTransport(**inner), client=client, ttl=ttl), **kwargs)


def _httpx() -> Any:
    try:
        import httpx2  # what openai 3 and anthropic 2 are built on

        return httpx2
    except ImportError:
        import httpx

        return httpx


_TRANSPORT_ARGS = ("verify", "cert", "http1", "http2", "limits", "proxy", "retries")


class Transport:
    """An httpx or httpx2 transport (each request says which) that answers LLM calls from Redis: POSTs of JSON to
    GENERATION_PATHS, keyed on the endpoint and the body, in one flight for the fleet. The rest goes to wrapped."""

    def __init__(self, wrapped: Any = None, *, client: Any = None, ttl: float | None = None) -> None:
        self.wrapped, self.client, self.ttl = wrapped, client, ttl
        self.own: dict[Any, Any] = {}  # without wrapped, a transport of each library its requests come from

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wrapped(self, lib: Any, kind: str) -> Any:
        if self.wrapped is None and lib not in self.own:
            self.own[lib] = getattr(lib, kind)()  # (a transport costs an SSL context: made once)
        return self.wrapped or self.own[lib]

    def handle_request(self, request: Any) -> Any:
        lib = sys.modules[type(request).__module__.partition(".")[0]]
        wrapped = self._wrapped(lib, "HTTPTransport")
        req = _http_req(request, _redis(self.client), self.ttl, _SYNC,
                        lambda sse: _forward(wrapped.handle_request(request), sse))
        if req is None:
            return _tagged(wrapped.handle_request(request), "bypass")
        try:
            value = _get(req)
            if value is _MISS:
                value = _single_flight(req)
        except _Refused as refused:
            return refused.response(lib)
        return _response(lib, iter(value) if isinstance(value, _Stored) else value, req.outcome)

    def close(self) -> None:
        for wrapped in filter(None, [self.wrapped, *self.own.values()]):
            wrapped.close()


class AsyncTransport(Transport):
    """Transport for an AsyncClient."""

    async def __aenter__(self) -> AsyncTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def handle_async_request(self, request: Any) -> Any:
        lib = sys.modules[type(request).__module__.partition(".")[0]]
        wrapped = self._wrapped(lib, "AsyncHTTPTransport")
        req = _http_req(request, _redis(self.client, sync=False), self.ttl, _chores(sync=False),
                        lambda sse: _aforward(wrapped, request, sse))
        if req is None:
            return _tagged(await wrapped.handle_async_request(request), "bypass")
        try:
            value = await _aget(req)
            if value is _MISS:
                value = await _asingle_flight(req)
        except _Refused as refused:
            return refused.response(lib)
        return _response(lib, _areplay(value) if isinstance(value, _Stored) else value, req.outcome)

    async def aclose(self) -> None:
        for wrapped in filter(None, [self.wrapped, *self.own.values()]):
            await wrapped.aclose()


def _http_req(request: Any, r: Any, ttl: Any, chores: _Chores, forward: Callable[[bool], Any]) -> _Req | None:
    """The cache's view of an HTTP request; None if it is not to be answered from the cache: no POST of a JSON object
    to a generation endpoint, or Cache-Control: no-store. The key holds no header but VERSION_HEADERS."""
    url, headers = request.url, _headers(request.headers.raw)
    control = _directives(headers.get("cache-control", ""))
    if (request.method != "POST" or not url.path.endswith(GENERATION_PATHS) or "/threads/" in url.path
            or "no-store" in control or "json" not in headers.get("content-type", "")):
        return None
    try:
        body = json.loads(request.content)
    except Exception:  # no JSON; or a streamed body, not read (RequestNotRead): not the cache's to buffer
        return None
    if not isinstance(body, dict) or "conversation" in body:  # a Responses conversation: server state, not the key
        return None
    versions = {name: headers[name] for name in VERSION_HEADERS if name in headers}
    fields = {name: value for name, value in body.items() if name not in IGNORED_FIELDS}
    # seven items: get_or_set's keys are made of three or four, so neither can name the other's entries
    key = _canonical([request.method, url.scheme, url.host, url.port, url.raw_path.decode(), versions, fields])
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) and all(isinstance(m, dict) for m in messages) else []
    sse = body.get("stream") is True  # as the SDKs decide it: by the request, whatever the answer's content-type
    req = _Req(r, _digest(key), lambda: forward(sse), ttl, chores, messages, str(body.get("model") or "-"))
    req.sse = sse
    age = "0" if "no-cache" in control else control.get("max-age", "")
    req.max_age = int(age) * 1000 if age.isdigit() else None
    return req


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request headers the cache reads, by their names in lower case (one pass: httpx's lookups are slow)."""
    wanted = {b"cache-control", b"content-type", *(name.encode() for name in VERSION_HEADERS)}
    return {name.decode().lower(): value.decode("latin-1") for name, value in raw if name.lower() in wanted}


def _directives(header: str) -> dict[str, str]:
    """Cache-Control's directives: no-store, no-cache, max-age=N."""
    return dict(part.strip().partition("=")[::2] for part in header.lower().split(","))


class _Refused(Exception):
    """A model's HTTP answer that is not cached (an error): each caller that shares it gets a response of its own,
    from which its SDK raises its own error."""

    def __init__(self, response: Any) -> None:
        super().__init__(response.status_code)
        self.status, self.content = response.status_code, response.content
        self.headers = [(name, value) for name, value in response.headers.multi_items()
                        if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")]

    def response(self, lib: Any) -> Any:
        return lib.Response(self.status, headers=[*self.headers, ("x-llm-cache", "bypass")], content=self.content)


def _forward(response: Any, sse: bool) -> Any:
    """The model's HTTP answer, for the cache: an _Http to store, or an SSE stream's text to relay."""
    if response.status_code // 100 != 2:
        response.read()
        raise _Refused(response)
    if sse or response.headers.get("content-type", "").startswith("text/event-stream"):
        return _sse(response)
    response.read()
    return _Http(response.status_code, response.headers.get("content-type", ""), response.content)


def _sse(response: Any) -> Iterator[str]:
    try:
        for part in response.iter_bytes():
            yield part.decode("utf-8", "surrogateescape")  # a character split between parts survives the round trip
    finally:
        response.close()


async def _aforward(wrapped: Any, request: Any, sse: bool) -> Any:
    response = await wrapped.handle_async_request(request)
    if response.status_code // 100 != 2:
        await response.aread()
        raise _Refused(response)
    if sse or response.headers.get("content-type", "").startswith("text/event-stream"):
        return _asse(response)
    await response.aread()
    return _Http(response.status_code, response.headers.get("content-type", ""), response.content)


async def _asse(response: Any) -> Any:
    try:
        async for part in response.aiter_bytes():
            yield part.decode("utf-8", "surrogateescape")
    finally:
        await response.aclose()


def _tagged(response: Any, outcome: str) -> Any:
    response.headers["x-llm-cache"] = outcome
    return response


def _response(lib: Any, value: Any, outcome: str) -> Any:
    """The SDK's response: a stored answer's status, content-type and body; a stream's chunks as they come."""
    if isinstance(value, _Http):
        return lib.Response(value.status, headers={"content-type": value.type, "x-llm-cache": outcome},
                            content=value.body)
    return lib.Response(200, headers={"content-type": "text/event-stream", "x-llm-cache": outcome},
                        stream=_body(lib)(value))


class _Body:
    """A streamed answer's body, as its chunks come. Closed once its last event is in, it reads the little that is
    left, so that the answer is stored: the openai SDK stops reading at data: [DONE]."""

    def __init__(self, chunks: Any) -> None:
        self.chunks, self.last = chunks, ""  # the end of what was handed out: the last event may span parts

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.last = (self.last + chunk)[-512:]
            yield chunk.encode("utf-8", "surrogateescape")

    async def __aiter__(self) -> Any:
        async for chunk in self.chunks:
            self.last = (self.last + chunk)[-512:]
            yield chunk.encode("utf-8", "surrogateescape")

    def close(self) -> None:
        if _ENDING.search(self.last):
            with contextlib.suppress(Exception):  # (the model's stream, closed already, say: what came is stored)
                for _ in self.chunks:
                    pass
        getattr(self.chunks, "close", lambda: None)()

    async def aclose(self) -> None:
        if _ENDING.search(self.last):
            with contextlib.suppress(Exception):
                async for _ in self.chunks:
                    pass
        await self.chunks.aclose()


@functools.cache
def _body(lib: Any) -> type:
    """_Body, as a byte stream of lib's: an httpx2 client takes no httpx one."""
    return type("Body", (_Body, lib.SyncByteStream, lib.AsyncByteStream), {})


# ---------------------------------------------------------------- stats

def stats(client: redis.Redis | redis.RedisCluster | None = None) -> dict[str, float]:
    """Hits, misses, hit_rate and tokens_saved under the current PREFIX, after this process's counts are sent (in a
    coroutine, await astats(): the running event loop's counts can only be sent from that loop). Redis errors are
    raised here."""
    pipe = _shards(_redis(client, sync=True))
    _run_chores(_SYNC, flush=True)
    concurrent.futures.wait(_flush_loops(), timeout=5)  # (a loop that is stuck keeps its counts)
    return _totals(pipe.execute())


async def astats(client: redis.asyncio.Redis | redis.asyncio.RedisCluster | None = None) -> dict[str, float]:
    """stats for asyncio."""
    pipe = _shards(_redis(client, sync=False))
    await _arun_chores(_chores(sync=False), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, _run_chores, _SYNC, True)  # (blocking I/O: not here)
    if flushes := [asyncio.wrap_future(done) for done in _flush_loops()]:
        await asyncio.wait(flushes, timeout=5)
    return _totals(await pipe.execute())


def _flush_loops() -> list[concurrent.futures.Future]:
    """The flushes of the other running event loops' counts, each on its own loop (their clients are theirs)."""
    try:
        mine = asyncio.get_running_loop()
    except RuntimeError:
        mine = None
    return [asyncio.run_coroutine_threadsafe(_arun_chores(chores, flush=True), loop)
            for loop, chores in list(_loop_chores.items()) if loop is not mine and loop.is_running()]


def _shards(r: Any) -> Any:
    """A pipeline that reads the 256 stats shards."""
    if r is None:
        raise ValueError("REDIS_URL is not a Redis URL (redis://, rediss:// or unix://)")
    pipe = r.pipeline(transaction=False)
    for tag in range(256):
        pipe.hgetall(f"{PREFIX}{{{tag:02x}}}stats")
    return pipe


def _totals(shards: list[dict]) -> dict[str, float]:
    totals = {"hits": 0, "misses": 0, "tokens_saved": 0}
    for shard in shards:
        for field, n in shard.items():
            totals[field if isinstance(field, str) else field.decode()] += int(n)
    calls = totals["hits"] + totals["misses"]
    return {**totals, "hit_rate": totals["hits"] / calls if calls else 0.0}
