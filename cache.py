"""Cache LLM calls in Redis: each distinct request calls the model once, for every worker of a fleet.

    out = get_or_set(messages, "gpt-4.1-mini", lambda: client.chat.completions.create(...).model_dump())
"""
from __future__ import annotations

import copy, functools, hashlib, json, logging, math, os, secrets, threading, time, weakref
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.commands.core import Script

PREFIX = os.environ.get("LLM_CACHE_PREFIX", "llm:v1:")  # bump it ("llm:v2:") to orphan every entry, no flush
DEFAULT_TTL = 24 * 3600  # seconds an entry lives unless it turns hot
HOT_TTL = 6 * 3600  # a hot entry's TTL slides up to this on every hit; a longer one is kept
HOT_THRESHOLD = 10  # hits that make an entry hot
LOCK_TTL = 10  # seconds a dead holder's lock blocks the others; a live holder renews it every LOCK_TTL / 3
MAX_WAIT = 900  # seconds a waiter waits for a live holder before calling itself (the openai SDK times out at 600)
RETRY_AFTER = 5  # seconds to leave a failed Redis alone: an outage costs one timeout, not one per call
REDIS_TIMEOUT = 0.5  # seconds, for the client made from REDIS_URL: the most a frozen Redis costs a call
DEFAULT_ENCODING = "cl100k_base"  # tiktoken's encoding for models it does not know

log = logging.getLogger(__name__)
_MISS = object()  # a cached None, "" or [] is a hit
_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
_down_until: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> when to try it again
_warned_until: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> when to warn of its errors again
_flights: dict[tuple[int, str], _Flight] = {}  # (client, entry) -> the thread of this process leading it
_wait_slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pool -> waiters' connections it may still open
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode  # built once


class _Flight:
    """One thread's way to an answer, through Redis and maybe the model; the process's other askers wait on it."""

    __slots__ = ("ended", "data", "error", "traceback", "leader")

    def __init__(self) -> None:
        self.ended, self.data, self.error, self.traceback = threading.Lock(), None, None, None
        self.ended.acquire()  # released when the leader has its answer (its JSON in data) or its exception
        self.leader = threading.get_ident()


def _forget_flights() -> None:  # a forked child inherits the flights, but not the threads that would end them
    _flights.clear()
    _wait_slots.clear()


os.register_at_fork(after_in_child=_forget_flights)


def _tag(hex2: str) -> str:
    # the hash tag that puts an entry, its lock, its stream and its stats shard in one Cluster slot
    return f"{PREFIX}{{{hex2}}}"


def _keys(messages: Any, model: Any, params: Any) -> list[str]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TypeError(f"messages must be a list of dicts, got {messages!r:.80}")
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
    digest = hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()
    tag = _tag(digest[:2])
    return [tag + digest, tag + digest + ":lock", tag + digest + ":stored", tag + "stats"]


def _tokens(messages: list, model: str, value: Any) -> int:
    """What producing an answer cost: its usage.total_tokens, else tiktoken's count of prompt and answer."""
    try:
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
        log.warning("llm cache: counting 0 tokens for an answer of %r: %r", model, e)
        return 0


@functools.lru_cache(maxsize=None)  # one load, or one failed load and its warning, per model
def _encoding(model: str) -> Any:
    try:
        import tiktoken  # needed only for answers that carry no usage

        try:
            return tiktoken.encoding_for_model(model)
        except KeyError:
            return tiktoken.get_encoding(DEFAULT_ENCODING)
    except Exception as e:  # offline with no cached encoding, say
        log.warning("llm cache: no tiktoken encoding for %r, its entries count 0 tokens: %r", model, e)
        return None


def _redis(client: Any) -> Any:
    return client if client is not None else _from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))


@functools.lru_cache(maxsize=None)
def _from_url(url: str) -> redis.Redis:
    # A timeout is not retried (a frozen Redis costs one); a dropped connection is, once, so a restart is seamless.
    retry = redis.retry.Retry(redis.backoff.NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT, retry=retry)


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
    return isinstance(error, redis.ConnectionError) and str(error) in ("Too many connections",
                                                                        "No connection available.")


# KEYS: 1 entry hash {v = JSON, t = tokens it cost, h = its hits}, 2 its lock, 3 the stream its waiters block on,
# 4 its stats shard.  ARGV: 1 lock token, 2 LOCK_TTL ms, 3 HOT_THRESHOLD, 4 HOT_TTL s, 5 (only after a read that
# found a corrupt value) that value.
# Returns the value on a hit (counted), 0 if the caller now holds the lock, else the lock's ms to live.
_READ = Script(None, b"""
local e = redis.pcall('HMGET', KEYS[1], 'v', 't')
if ARGV[5] then  -- the caller's last read was no hit (its tokens are taken back below, unless replaced meanwhile)
  redis.pcall('HINCRBY', KEYS[4], 'hits', -1)
  if not e.err and e[1] == ARGV[5] then  -- still that value: a miss (never a newer one)
    redis.pcall('HINCRBY', KEYS[4], 'tokens_saved', -(tonumber(e[2]) or 0))
    e = {}
  end
end
if e.err or not e[1] then  -- missing, or a key of another type that _FINISH overwrites
  -- the GET lets a client's retry of this very call keep the lock it took
  if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) or redis.call('GET', KEYS[2]) == ARGV[1] then
    redis.call('DEL', KEYS[3])
    return 0
  end
  return math.max(redis.call('PTTL', KEYS[2]), 1)
end
-- pcall: a Redis out of memory (noeviction) refuses the bookkeeping, but still serves the hit
local hits = tonumber(redis.pcall('HINCRBY', KEYS[1], 'h', 1)) or 0
if hits >= tonumber(ARGV[3]) and redis.call('TTL', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
redis.pcall('HINCRBY', KEYS[4], 'hits', 1)
redis.pcall('HINCRBY', KEYS[4], 'tokens_saved', e[2] or 0)
return e[1]
""")
# KEYS[1] a lock.  ARGV: 1 the holder's token, 2 LOCK_TTL ms.  Returns 1 if the lock was still the holder's.
_RENEW = Script(None, b"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
""")
# KEYS as _READ.  ARGV: 1 lock token, 2 JSON value ('' stores nothing), 3 its tokens, 4 ttl ms, 5 LOCK_TTL ms,
# 6 (optional) the corrupt value the caller found.  The first answer stored wins: the value is stored
# only over no entry, another type or that corrupt value, else the stored one is returned.  Releases the lock if
# the caller still owns it, and wakes the waiters if either happened.
_FINISH = Script(None, b"""
local stored, wake = nil, false
if ARGV[2] ~= '' then
  stored = redis.pcall('HGET', KEYS[1], 'v')
  if type(stored) ~= 'string' or stored == ARGV[6] then
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'v', ARGV[2], 't', ARGV[3])
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    redis.call('HINCRBY', KEYS[4], 'misses', 1)
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


def _run(script: Script, r: Any, keys: list[str], *args: Any) -> Any:
    """One round trip; replies undecoded. A pool with no connection free is waited on, up to LOCK_TTL."""
    give_up = None
    while True:
        try:
            try:  # EVALSHA straight from the client: through Script.__call__ a hit measured 6-10% slower
                return r.execute_command("EVALSHA", script.sha, len(keys), *keys, *args, NEVER_DECODE=True)
            except redis.exceptions.NoScriptError:  # a new or flushed server: EVAL runs the script and caches it
                return r.execute_command("EVAL", script.script, len(keys), *keys, *args, NEVER_DECODE=True)
        except redis.ConnectionError as e:
            give_up = give_up or time.monotonic() + LOCK_TTL
            if not _exhausted(e) or time.monotonic() > give_up:
                raise
            time.sleep(0.002)


def _lookup(r: Any, keys: list[str], token: str, deadline: float) -> tuple[Any, bytes | None, tuple[bytes, ...]]:
    """The cached value and its JSON; or _MISS once the caller should call the model (holding the lock unless it
    waited until the deadline). Last, a corrupt value found on the way, which the caller's store may replace."""
    corrupt, last_corrupt, conn, slots, slot, seen = (), (), None, None, False, "0-0"
    try:
        while True:
            reply = _run(_READ, r, keys, token, int(LOCK_TTL * 1000), HOT_THRESHOLD, HOT_TTL, *last_corrupt)
            last_corrupt = ()
            if not isinstance(reply, int):
                try:
                    return json.loads(reply), reply, corrupt
                except ValueError:  # not JSON, or not UTF-8: the next read takes it back as a hit
                    corrupt = last_corrupt = (reply,)
                    continue
            left = deadline - time.monotonic()
            if reply == 0 or left <= 0:
                return _MISS, None, corrupt
            # Sleep until the holder stores its answer or its lock expires. On a connection of the waiter's own,
            # so that waiters never hold the pool's connections, but no more of them than the pool may open;
            # past that, or if the server refuses one (maxclients), poll every 50 ms.
            if slots is None:
                pool = r.get_node_from_key(keys[2]).redis_connection.connection_pool \
                    if isinstance(r, redis.RedisCluster) else r.connection_pool
                slots = _wait_slots.setdefault(pool, threading.BoundedSemaphore(pool.max_connections))
                slot = slots.acquire(blocking=False)
                if slot:
                    conn = pool.connection_class(**pool.connection_kwargs)
                    timeout = conn.socket_timeout  # blocks last up to this, and the reply may take as long again
                    conn.socket_timeout = 2 * timeout if timeout else None
            if conn is None:
                time.sleep(min(reply, left * 1000, 50) / 1000)
                continue
            block = max(1, int(min(reply, left * 1000, (timeout or 1) * 1000)))
            try:  # from the last entry seen: one a late holder stored, and which expired since, wakes no one
                conn.send_command("XREAD", "COUNT", 1, "BLOCK", block, "STREAMS", keys[2], seen)
                woken = conn.read_response()  # RESP3 replies a map, RESP2 a list of [stream, entries]
                if woken:
                    seen = (next(iter(woken.values())) if isinstance(woken, dict) else woken[0][1])[-1][0]
            except redis.TimeoutError:  # slow, or frozen: the next read tells
                conn.disconnect()
            except redis.ConnectionError:  # dropped, or refused (maxclients): poll once, then connect again
                conn.disconnect()
                time.sleep(min(reply, left * 1000, 50) / 1000)
    finally:
        if conn is not None:
            conn.disconnect()
        if slot:
            slots.release()


def _renew(r: Any, lock: str, token: str, done: threading.Event) -> None:
    # python-redis-lock's auto_renewal: the holder's lock outlives any call, and dies with the holder's process
    while not done.wait(LOCK_TTL / 3):
        try:
            if not _run(_RENEW, r, [lock], token, int(LOCK_TTL * 1000)):
                return  # not the holder (any more): the first answer stored wins
        except _ERRORS:
            pass  # Redis is away; if it stays away the lock expires, which costs a duplicate call at most


def get_or_set(messages: list[dict], model: str, call_fn: Callable[[], Any], ttl: float | None = None, *,
               client: redis.Redis | redis.RedisCluster | None = None, params: dict | None = None) -> Any:
    """call_fn()'s answer to this request, as JSON gives it back; the model is called only on a miss."""
    ttl = DEFAULT_TTL if ttl is None else ttl
    keys = _keys(messages, model, params)
    if not callable(call_fn):
        raise TypeError(f"call_fn must be a callable taking no arguments, got {type(call_fn).__name__}")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be a positive number of seconds, got {type(ttl).__name__}")
    if not 0 < ttl < math.inf:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl}")
    r = _redis(client)
    # Go's singleflight: one thread per process and request goes to Redis and the model, the others wait for it
    mine, flight_key, deadline = _Flight(), (id(r), keys[0]), time.monotonic() + MAX_WAIT
    try:
        flight = _flights.setdefault(flight_key, mine)  # atomic: one dict operation
        if flight is not mine:
            if flight.leader == threading.get_ident():  # call_fn asked for its own request: don't wait for itself
                deadline = time.monotonic()
            elif flight.ended.acquire(timeout=min(MAX_WAIT, threading.TIMEOUT_MAX)):  # as a Redis waiter would
                flight.ended.release()
            if flight.error is not None:  # a copy where one can be made, so that each caller has its own traceback
                raise _copied(flight.error).with_traceback(flight.traceback)
            if flight.data is not None:  # a hit in Redis now; if Redis can't answer, the leader's answer is the call
                call_fn = functools.partial(json.loads, flight.data)
            return _get_or_set(r, keys, messages, model, call_fn, ttl, deadline)[0]
        result, mine.data = _get_or_set(r, keys, messages, model, call_fn, ttl, deadline)
        return result
    except Exception as e:
        mine.error, mine.traceback = e, e.__traceback__
        raise
    finally:  # with neither answer nor exception (a stream, say), each waiter makes its own call
        if _flights.get(flight_key) is mine:  # not if a fork in call_fn forgot it
            del _flights[flight_key]
        mine.ended.release()


def _copied(error: Exception) -> Exception:
    try:
        return copy.copy(error)
    except Exception:  # an exception class copy can't rebuild: share the one object
        return error


def _get_or_set(r: Any, keys: list[str], messages: list, model: str, call_fn: Callable[[], Any], ttl: float,
                deadline: float) -> tuple[Any, str | bytes | None]:
    """The answer, and its JSON if it may be shared."""
    token, may_hold, lost = secrets.token_hex(8), _down_until.get(r, 0) <= time.monotonic(), False
    corrupt: tuple[bytes, ...] = ()
    if may_hold:  # else Redis failed moments ago: don't wait on it again yet
        try:
            value, data, corrupt = _lookup(r, keys, token, deadline)
            if _down_until.pop(r, None):
                log.warning("llm cache: Redis answers again, caching resumed")
            if value is not _MISS:
                return value, data
        except _ERRORS as e:
            _failed(r, e)
            # a reply lost after the server ran the script may have given the caller the lock all the same:
            # then it renews, stores and releases like any holder (the owner check makes that safe)
            may_hold = lost = isinstance(e, redis.TimeoutError)
    done, data = threading.Event(), None
    if may_hold:
        _start(_renew, r, keys[1], token, done)
    try:
        result = call_fn()
        if not isinstance(result, Iterator):  # a stream is the caller's to consume, never cached
            if hasattr(result, "model_dump"):  # pydantic, such as the openai SDK's ChatCompletion
                result = result.model_dump(mode="json")
            try:
                data = json.dumps(result, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as e:
                raise TypeError(f"call_fn returned a {type(result).__name__}, not JSON or pydantic: {e}") from None
            result = json.loads(data)  # exactly what a later hit returns
    finally:  # also when call_fn raised: release the lock at once, so the next caller need not wait
        done.set()
        if may_hold:
            args = (r, keys, token, data or "", _tokens(messages, model, result) if data else 0, ttl, corrupt)
            if not (lost and _start(_finish, *args)):  # after a timeout, the caller doesn't wait for another
                stored = _finish(*args)
                if stored is not None:  # another worker's answer came first: everyone gets that one
                    result, data = stored
    return result, data


def _finish(r: Any, keys: list[str], token: str, data: str, tokens: int, ttl: float,
            corrupt: tuple[bytes, ...]) -> tuple[Any, bytes] | None:
    """Store, release and wake; the answer stored before this one, if there was one."""
    try:
        stored = _run(_FINISH, r, keys, token, data, tokens, math.ceil(ttl * 1000), int(LOCK_TTL * 1000), *corrupt)
        return None if stored is None else (json.loads(stored), stored)
    except _ERRORS as e:
        _failed(r, e)
    except ValueError:  # the first answer is corrupt; the next reader replaces it
        pass
    return None


def _start(target: Callable, *args: Any) -> bool:
    try:
        threading.Thread(target=target, args=args, daemon=True).start()
        return True
    except RuntimeError:  # no thread to be had (at interpreter shutdown, say): do without
        return False


def stats(client: redis.Redis | redis.RedisCluster | None = None) -> dict[str, float]:
    """Hits, misses, hit_rate and tokens_saved under the current PREFIX. Redis errors are raised here."""
    pipe = _redis(client).pipeline(transaction=False)
    for tag in range(256):
        pipe.hgetall(_tag(f"{tag:02x}") + "stats")
    totals = {"hits": 0, "misses": 0, "tokens_saved": 0}
    for shard in pipe.execute():
        for field, n in shard.items():
            totals[field if isinstance(field, str) else field.decode()] += int(n)
    calls = totals["hits"] + totals["misses"]
    return {**totals, "hit_rate": totals["hits"] / calls if calls else 0.0}
