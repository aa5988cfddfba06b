"""Tests for cache.py, on fakeredis and on real redis-server processes that the tests start and stop."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import functools
import gc
import hashlib
import json
import logging
import math
import os
import pathlib
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pydantic
import pytest
import redis
import redis.asyncio
import tiktoken
from hypothesis import given
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from redis.crc import key_slot

import cache
from conftest import (
    ANSWER,
    BYTES,
    FORK,
    MSGS,
    PAIRS,
    Loop,
    Server,
    _free_port,
    _in_threads,
    _need,
    _until,
    async_twin,
    counting,
    elsewhere,
    thread_with_ident,
    twin,
)


def run_script(r, script, keys, *args):
    """One of cache.py's scripts, run on a sync client as the module runs it."""
    return cache._script(r, script, keys, *args)


# ---------------------------------------------------------------- keys

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=10)
messages_st = st.lists(st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=4), max_size=4)


def reordered(value):
    """The same JSON value with every dict's keys in reverse insertion order."""
    if isinstance(value, dict):
        return {k: reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(v) for v in value]
    return value


@given(messages_st, st.text(min_size=1), st.dictionaries(st.text(), json_values, max_size=3))
def test_dict_key_order_never_changes_the_key(messages, model, params):
    assert cache._keys(messages, model, params) == cache._keys(reordered(messages), model, reordered(params))


@given(messages_st, st.text(min_size=1), st.text(min_size=1))
def test_any_other_model_gives_another_key(messages, model, other):
    if model != other:
        assert cache._keys(messages, model, None)[0] != cache._keys(messages, other, None)[0]


@given(messages_st, messages_st, st.text(min_size=1))
def test_any_other_message_gives_another_key(messages, others, model):
    if messages != others:
        assert cache._keys(messages, model, None)[0] != cache._keys(others, model, None)[0]


def test_system_prompt_and_params_are_part_of_the_key():
    base = cache._keys(MSGS, "gpt-4", None)[0]
    other_system = [{"role": "system", "content": "You are verbose."}] + MSGS[1:]
    assert cache._keys(other_system, "gpt-4", None)[0] != base
    assert cache._keys(MSGS, "gpt-4", {"temperature": 0.7})[0] != base
    assert cache._keys(MSGS, "gpt-4", {"temperature": 0.7})[0] != cache._keys(MSGS, "gpt-4", {"temperature": 0})[0]
    assert cache._keys(MSGS, "gpt-4", {})[0] == base  # no params and empty params are the same request


def test_key_is_sha256_of_canonical_json_with_non_ascii_kept():
    import hashlib

    messages = [{"role": "user", "content": "Grüße, 世界"}]
    canonical = json.dumps(["m", messages, {}], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert cache._keys(messages, "m", None)[0].endswith(hashlib.sha256(canonical.encode()).hexdigest())


@given(st.text(min_size=1), messages_st)
def test_entry_lock_and_counter_share_one_cluster_slot(model, messages):
    keys = cache._keys(messages, model + "{x}}{", None)
    assert len({key_slot(k.encode()) for k in keys}) == 1


# ---------------------------------------------------------------- miss, hit, values

def test_second_identical_call_is_a_hit(ask, client):
    call_fn = counting({"answer": (1, 2), "text": "Grüße"})
    first = ask(MSGS, "gpt-4", call_fn, client=client)
    second = ask(MSGS, "gpt-4", call_fn, client=client)
    assert call_fn.calls == 1
    assert first == second == {"answer": [1, 2], "text": "Grüße"}  # what JSON gives back, miss and hit alike


@pytest.mark.parametrize("falsy", [None, "", 0, [], {}, False])
def test_a_cached_falsy_value_is_a_hit(ask, client, falsy):
    call_fn = counting(falsy)
    assert ask(MSGS, "m", call_fn, client=client) == falsy
    assert ask(MSGS, "m", call_fn, client=client) == falsy
    assert call_fn.calls == 1


def test_pydantic_result_is_stored_as_its_json_dump(ask, client):
    class Answer(pydantic.BaseModel):
        text: str
        score: float

    first = ask(MSGS, "m", lambda: Answer(text="hi", score=0.5), client=client)
    second = ask(MSGS, "m", counting(), client=client)
    assert first == second == {"text": "hi", "score": 0.5}


@pytest.mark.parametrize("bad", [object(), {1, 2}, b"bytes", {"x": math.nan}])
def test_non_json_result_raises_type_error_and_stores_nothing(ask, client, bad):
    with pytest.raises(TypeError) as raised:
        ask(MSGS, "m", lambda: bad, client=client)
    assert type(bad).__name__ in str(raised.value)
    keys = cache._keys(MSGS, "m", None)
    assert client.exists(keys[0], keys[1]) == 0  # no entry, no lock left behind
    call_fn = counting()
    assert ask(MSGS, "m", call_fn, client=client) == ANSWER
    assert call_fn.calls == 1


def test_ttl_is_the_entry_lifetime(ask, client):
    ask(MSGS, "m", counting(), ttl=120, client=client)
    assert 110 < client.ttl(cache._keys(MSGS, "m", None)[0]) <= 120
    ask(MSGS, "n", counting(), client=client)
    assert cache.DEFAULT_TTL - 10 < client.ttl(cache._keys(MSGS, "n", None)[0]) <= cache.DEFAULT_TTL


# ---------------------------------------------------------------- hit counting and hot keys

def _window_hits(client, entry):
    """The hits of the entry's current hot window; None before its first hit."""
    hits = client.hget(entry, "n")
    return None if hits is None else int(hits)


def test_hits_are_counted_and_hot_entries_slide_to_hot_ttl(ask, client, monkeypatch):
    monkeypatch.setattr(cache, "HOT_THRESHOLD", 3)
    monkeypatch.setattr(cache, "HOT_TTL", 1000)
    entry = cache._keys(MSGS, "m", None)[0]
    ask(MSGS, "m", counting(), ttl=100, client=client)
    ask.stats(client=client)  # (hits are sent by the process's worker: stats sends them now)
    assert _window_hits(client, entry) is None  # a miss is not a hit
    for n in (1, 2):
        ask(MSGS, "m", counting(), ttl=100, client=client)
        ask.stats(client=client)
        assert _window_hits(client, entry) == n
        assert 90 < client.ttl(entry) <= 100  # below the threshold a hit leaves the TTL alone
    ask(MSGS, "m", counting(), ttl=100, client=client)
    ask.stats(client=client)
    assert 990 < client.ttl(entry) <= 1000  # the threshold-th hit makes it hot
    client.expire(entry, 500)  # time passes
    ask(MSGS, "m", counting(), ttl=100, client=client)
    ask.stats(client=client)
    assert 990 < client.ttl(entry) <= 1000  # sliding: every hot hit extends it from now
    assert _window_hits(client, entry) == 4
    assert ask.stats(client=client)["hits"] == 4


@pytest.mark.parametrize("window, gap, hot", [(0.05, 0.06, False), (60, 0, True)], ids=["spread", "inside"])
def test_only_hits_within_the_hot_window_make_an_entry_hot(ask, client, monkeypatch, window, gap, hot):
    monkeypatch.setattr(cache, "HOT_THRESHOLD", 3)
    monkeypatch.setattr(cache, "HOT_TTL", 1000)
    monkeypatch.setattr(cache, "HOT_WINDOW", window)
    entry = cache._keys(MSGS, "m", None)[0]
    ask(MSGS, "m", counting(), ttl=100, client=client)
    for _ in range(5):  # five hits, each `gap` after the last: wider than a 50 ms window, or inside a minute
        time.sleep(gap)
        ask(MSGS, "m", counting(), ttl=100, client=client)
        ask.stats(client=client)  # each sent on its own, as a worker's flush a second apart would send them
    assert (client.ttl(entry) > 100) is hot
    assert _window_hits(client, entry) == (5 if hot else 1)  # each spread hit opens a window of its own


def test_a_float_hot_ttl_works(client, monkeypatch, caplog):
    monkeypatch.setattr(cache, "HOT_THRESHOLD", 1)
    monkeypatch.setattr(cache, "HOT_TTL", 1.5 * 3600)
    call_fn = counting()
    with caplog.at_level(logging.WARNING, logger="cache"):
        for _ in range(3):
            assert cache.get_or_set(MSGS, "m", call_fn, ttl=100, client=client) == ANSWER
        cache.stats(client=client)  # sends the hits, which apply HOT_TTL
    assert call_fn.calls == 1 and caplog.records == []
    assert 5390 < client.ttl(cache._keys(MSGS, "m", None)[0]) <= 5400


def test_the_largest_hot_ttl_works(client, monkeypatch, caplog):
    monkeypatch.setattr(cache, "HOT_THRESHOLD", 1)
    monkeypatch.setattr(cache, "HOT_TTL", cache._MAX_SECONDS)  # ms that Lua would print as 9.2e+18
    call_fn = counting()
    with caplog.at_level(logging.WARNING, logger="cache"):
        for _ in range(3):
            assert cache.get_or_set(MSGS, "m", call_fn, ttl=100, client=client) == ANSWER
        cache.stats(client=client)  # sends the hits, which apply HOT_TTL
    assert call_fn.calls == 1 and caplog.records == []
    assert client.ttl(cache._keys(MSGS, "m", None)[0]) > 10**15


def test_a_window_opened_by_a_clock_ahead_is_no_window(client, monkeypatch):
    monkeypatch.setattr(cache, "HOT_THRESHOLD", 3)
    monkeypatch.setattr(cache, "HOT_TTL", 1000)
    entry = cache._keys(MSGS, "m", None)[0]
    cache.get_or_set(MSGS, "m", counting(), ttl=100, client=client)
    for opened in (int((time.time() + 3600) * 1000), "1.5e400"):  # a worker an hour ahead; a corrupt field
        client.hset(entry, mapping={"w": opened, "n": 2})
        cache.get_or_set(MSGS, "m", counting(), ttl=100, client=client)
        cache.stats(client=client)
        assert _window_hits(client, entry) == 1  # this hit opened a window of its own
        assert client.ttl(entry) <= 100


@pytest.mark.parametrize("threshold, hot_ttl, ttl", [(1, 0, 100), (2, 1000, 5000)],
                         ids=["hot-ttl-zero-turns-promotion-off", "a-longer-ttl-is-kept"])
def test_hot_hits_never_shorten_or_lengthen_a_ttl_they_should_not(client, monkeypatch, threshold, hot_ttl, ttl):
    monkeypatch.setattr(cache, "HOT_THRESHOLD", threshold)
    monkeypatch.setattr(cache, "HOT_TTL", hot_ttl)
    for _ in range(5):
        cache.get_or_set(MSGS, "m", counting(), ttl=ttl, client=client)
    assert cache.stats(client=client)["hits"] == 4  # the hits sent, and applied
    assert ttl - 10 < client.ttl(cache._keys(MSGS, "m", None)[0]) <= ttl


def test_a_new_answer_starts_its_hit_count_afresh(ask, client, monkeypatch):
    monkeypatch.setattr(cache, "HOT_THRESHOLD", 3)
    monkeypatch.setattr(cache, "HOT_TTL", 1000)
    entry = cache._keys(MSGS, "m", None)[0]
    for _ in range(3):  # a miss, then two hits
        ask(MSGS, "m", counting(), ttl=100, client=client)
    ask.stats(client=client)  # the two hits sent
    assert _window_hits(client, entry) == 2
    client.hset(entry, "v", "{broken")  # corrupt: the next caller stores a new answer
    ask(MSGS, "m", counting(), ttl=100, client=client)
    ask.stats(client=client)
    assert _window_hits(client, entry) is None
    ask(MSGS, "m", counting(), ttl=100, client=client)
    ask.stats(client=client)
    assert _window_hits(client, entry) == 1
    assert 90 < client.ttl(entry) <= 100


# ---------------------------------------------------------------- prefix

def test_bumping_prefix_orphans_every_entry_without_a_flush(ask, client, monkeypatch):
    call_fn = counting()
    ask(MSGS, "m", call_fn, client=client)
    old_entry = cache._keys(MSGS, "m", None)[0]
    monkeypatch.setattr(cache, "PREFIX", cache.PREFIX + "v2:")
    ask(MSGS, "m", call_fn, client=client)
    ask(MSGS, "m", call_fn, client=client)
    assert call_fn.calls == 2
    assert client.exists(old_entry) == 1


def test_prefix_default_comes_from_the_environment():
    env = {**os.environ, "LLM_CACHE_PREFIX": "app:v7:"}
    out = subprocess.run([sys.executable, "-c", "import cache; print(cache.PREFIX)"], env=env, capture_output=True,
                         text=True, cwd=pathlib.Path(__file__).parent, check=True)
    assert out.stdout.strip() == "app:v7:"


# ---------------------------------------------------------------- errors and bad input

def test_call_fn_exception_propagates_and_releases_the_lock_at_once(ask, client):
    boom = RuntimeError("model down")

    def failing():
        raise boom

    with pytest.raises(RuntimeError) as raised:
        ask(MSGS, "m", failing, client=client)
    assert raised.value is boom
    keys = cache._keys(MSGS, "m", None)
    assert client.exists(keys[0], keys[1]) == 0
    call_fn = counting()
    assert ask(MSGS, "m", call_fn, client=client) == ANSWER  # the next caller does not wait LOCK_TTL
    assert call_fn.calls == 1


@pytest.mark.parametrize("how", ["call_fn raises", "not JSON", "the stream breaks"])
def test_an_async_call_that_fails_lets_the_lock_go_before_the_error_reaches_the_caller(ask_async_client, client, how):
    # as get_or_set does: the error is the caller's, not a cancellation, so nothing stops it from letting go itself
    loop, aclient = ask_async_client
    keys = cache._keys(MSGS, "m", None)

    def failing():
        raise RuntimeError("model down")

    async def main():
        with pytest.raises((RuntimeError, TypeError, ConnectionResetError)):
            if how == "the stream breaks":
                stream = await cache.aget_or_set(MSGS, "m", Model(breaks={1}), client=aclient)
                async for _ in stream:
                    pass
            else:
                await cache.aget_or_set(MSGS, "m", failing if how == "call_fn raises" else object, client=aclient)
        return await aclient.exists(keys[0], keys[1])  # at once: no step of the loop between

    assert loop.run(main()) == 0


def test_a_stop_iteration_raised_by_call_fn_reaches_the_caller_as_it_is(ask, client):
    stop = StopIteration("no answer")

    def call_fn():
        raise stop

    with pytest.raises((StopIteration, RuntimeError)) as raised:
        ask(MSGS, "m", call_fn, client=client)
    if ask.sync:
        assert raised.value is stop
    else:  # Python turns a StopIteration that leaves a coroutine into a RuntimeError (PEP 479)
        assert type(raised.value) is RuntimeError and raised.value.__cause__ is stop


@pytest.mark.parametrize("corrupt", [
    lambda c, k: c.set(k, "not json at all"),
    lambda c, k: c.hset(k, mapping={"v": "{broken", "t": "3"}),
    lambda c, k: c.rpush(k, "a list"),
    lambda c, k: c.hset(k, mapping={"v": b"\xff\xfe not UTF-8", "t": "3"}),
])
def test_a_corrupt_entry_is_a_miss_and_is_overwritten(ask, client, corrupt):
    entry = cache._keys(MSGS, "m", None)[0]
    corrupt(client, entry)
    call_fn = counting()
    assert ask(MSGS, "m", call_fn, client=client) == ANSWER
    assert ask(MSGS, "m", call_fn, client=client) == ANSWER
    assert call_fn.calls == 1
    # the read that found the corrupt value counted no hit and none of its tokens
    assert ask.stats(client=client) == {"hits": 1, "misses": 1, "tokens_saved": 23, "hit_rate": 0.5}


def test_a_corrupt_entry_replaced_meanwhile_by_a_good_answer_is_kept(client, monkeypatch):
    entry = cache._keys(MSGS, "m", None)[0]
    # t is no number here: a numeric one would stay counted, as the read that found the corrupt value carried
    # no t back, and the value it would take back is gone (a limit the README states)
    client.hset(entry, mapping={"v": "{broken", "t": "x"})
    good = {"by": "another worker", "usage": {"total_tokens": 7}}
    real = client.execute_command

    def meddling(*args, **options):  # another worker stores a good answer just after the corrupt one is read
        reply = real(*args, **options)
        if reply == b"{broken":
            client.hset(entry, mapping={"v": json.dumps(good), "t": 7})
        return reply

    monkeypatch.setattr(client, "execute_command", meddling)
    call_fn = counting()
    assert cache.get_or_set(MSGS, "m", call_fn, client=client) == good
    assert call_fn.calls == 0
    assert json.loads(client.hget(entry, "v")) == good  # not deleted, not overwritten
    assert cache.stats(client=client) == {"hits": 1, "misses": 0, "tokens_saved": 7, "hit_rate": 1.0}


@pytest.mark.parametrize("corrupt", [b"\x00garbage", b"\x1fOK text/plain\nhello", b"\x1e" + b"0" * 16 + b"{}"],
                         ids=["not-json", "bad-http-head", "stream-of-no-list"])
def test_a_corrupt_entry_stored_during_the_call_never_fails_it(ask, client, corrupt):
    entry = cache._keys(MSGS, "m", None)[0]

    def call_fn():
        client.hset(entry, "v", corrupt)  # another writer, while the model answers
        return ANSWER

    assert ask(MSGS, "m", call_fn, client=client) == ANSWER
    again = counting({"by": "the next caller"})
    assert ask(MSGS, "m", again, client=client) == ask(MSGS, "m", again, client=client) == {"by": "the next caller"}
    assert again.calls == 1  # the corrupt entry was a miss, and was replaced


def test_an_answer_stored_during_the_call_that_is_no_response_model_never_fails_it(client):
    class City(pydantic.BaseModel):
        name: str

    entry = cache._keys(MSGS, "m", None, City)[0]

    def call_fn():
        client.hset(entry, "v", json.dumps({"size": 1}))  # another shape, stored while the model answers
        return City(name="Paris")

    assert cache.get_or_set(MSGS, "m", call_fn, client=client, response_model=City) == City(name="Paris")


def test_a_damaged_stats_shard_costs_no_release(ask, client):
    entry, lock, _, shard = cache._keys(MSGS, "m", None)
    client.hset(shard, "misses", "not a number")
    assert ask(MSGS, "m", counting(), client=client) == ANSWER
    assert client.exists(lock) == 0 and client.hexists(entry, "v")


def test_a_flushed_script_cache_is_refilled_without_a_miss_or_warning(ask, client, caplog):
    call_fn = counting()
    ask(MSGS, "m", call_fn, client=client)
    client.script_flush()  # a restarted or failed-over server knows no scripts
    with caplog.at_level(logging.WARNING, logger="cache"):
        assert ask(MSGS, "m", call_fn, client=client) == ANSWER  # a hit (a plain HGET)
        other = counting()
        assert ask(MSGS, "n", other, client=client) == ANSWER  # a miss: the lock's and the store's scripts
        assert ask(MSGS, "n", other, client=client) == ANSWER
    assert client.script_exists(cache._LOCK.sha, cache._FINISH.sha) == [True, True]
    assert call_fn.calls == 1 and other.calls == 1
    assert caplog.records == []
    assert ask.stats(client=client)["hits"] == 2


class Untouchable(redis.Redis):
    """A redis-py client that fails the test on any command."""

    def __init__(self):
        pass

    def execute_command(self, *args, **options):
        raise AssertionError(f"Redis was touched: {args[0]}")

    def pipeline(self, *args, **options):
        raise AssertionError("Redis was touched: pipeline")


def nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


class Needy:
    def ask(self, question):
        return ANSWER

    async def answer(self):
        return ANSWER


@pytest.mark.parametrize("change, error, message", [
    ({"messages": "hello"}, TypeError, "messages must be a list of dicts"),
    ({"messages": [{"role": "user"}, "hello"]}, TypeError, "messages must be a list of dicts"),
    ({"messages": [{"content": object()}]}, TypeError, "JSON-serializable"),
    ({"messages": [{"content": nested(100_000)}]}, ValueError, "nest too deeply"),
    ({"model": ""}, ValueError, "model must be a non-empty str"),
    ({"model": None}, TypeError, "model must be a non-empty str"),
    ({"call_fn": "not callable"}, TypeError, "call_fn must be a callable taking no arguments"),
    ({"call_fn": lambda messages: ANSWER}, TypeError, "call_fn must be a callable taking no arguments"),
    ({"call_fn": lambda *, model: ANSWER}, TypeError, "call_fn must be a callable taking no arguments"),
    ({"call_fn": Needy().ask}, TypeError, "call_fn must be a callable taking no arguments, got Needy.ask"),
    ({"call_fn": Needy().answer}, TypeError, "call_fn is a coroutine function (Needy.answer): await aget_or_set"),
    ({"messages": nested(100_000)}, TypeError, "messages must be a list of dicts, got [[[[[["),
    ({"ttl": 0}, ValueError, "ttl must be from 0.001 to 9223367741887479 seconds, got 0"),
    ({"ttl": -5}, ValueError, "ttl must be from 0.001 to 9223367741887479 seconds, got -5"),
    ({"ttl": math.nan}, ValueError, "ttl must be from 0.001 to 9223367741887479 seconds, got nan"),
    ({"ttl": sys.maxsize}, ValueError, f"ttl must be from 0.001 to 9223367741887479 seconds, got {sys.maxsize}"),
    ({"ttl": "60"}, TypeError, "ttl must be a number of seconds, got str"),
    ({"ttl": True}, TypeError, "ttl must be a number of seconds, got bool"),
    ({"params": "temperature=0"}, TypeError, "params must be a dict or None"),
    ({"params": {"seed": object()}}, TypeError, "JSON-serializable"),
    ({"params": {"seed": nested(100_000)}}, ValueError, "nest too deeply"),
    ({"client": openai.OpenAI(api_key="x")}, TypeError, "client must be a redis.Redis or redis.RedisCluster, got "
                                                        "OpenAI"),
    ({"client": redis.asyncio.Redis()}, TypeError, "client must be a redis.Redis or redis.RedisCluster, got Redis"),
    ({"client": redis.Redis().pipeline()}, TypeError, "client must be a redis.Redis or redis.RedisCluster, got "
                                                      "Pipeline"),
])
def test_bad_arguments_fail_before_redis_or_the_model_is_touched(change, error, message):
    call_fn = counting()
    args = {"messages": MSGS, "model": "m", "call_fn": call_fn, "ttl": 60, "params": None, "client": Untouchable(),
            **change}
    with pytest.raises(error) as raised:
        cache.get_or_set(**args)
    assert message in str(raised.value)
    assert call_fn.calls == 0


@pytest.mark.parametrize("setting, value, error, message", [
    ("LOCK_TTL", 0, ValueError, f"LOCK_TTL must be from 0.1 to {int(threading.TIMEOUT_MAX)} seconds, got 0"),
    ("LOCK_TTL", 0.05, ValueError, "LOCK_TTL must be from 0.1"),  # renewals every 17 ms lose the lock
    ("LOCK_TTL", 1e12, ValueError, "LOCK_TTL must be from 0.1"),  # no thread can wait a third of it
    ("LOCK_TTL", "10", TypeError, "LOCK_TTL must be a number of seconds, got str"),
    ("HOT_TTL", -1, ValueError, "HOT_TTL must be from 0 to"),
    ("HOT_TTL", math.inf, ValueError, "HOT_TTL must be from 0 to 9223367741887479 seconds, got inf"),
    ("HOT_WINDOW", 0, ValueError, "HOT_WINDOW must be from 0.001"),
    ("HOT_THRESHOLD", 0, ValueError, "HOT_THRESHOLD must be at least 1, got 0"),
    ("HOT_THRESHOLD", 2.5, TypeError, "HOT_THRESHOLD must be a whole number of hits, got float"),
    ("STATS_TTL", math.nan, ValueError, "STATS_TTL must be from 0.001"),
    ("DEFAULT_TTL", 10**20, ValueError, "DEFAULT_TTL must be from 0.001 to 9223367741887479 seconds"),
    ("MAX_WAIT", math.nan, ValueError, "MAX_WAIT must be from 0"),
    ("MAX_WAIT", -2, ValueError, "MAX_WAIT must be from 0"),
    ("RETRY_AFTER", "5", TypeError, "RETRY_AFTER must be a number of seconds, got str"),
    ("STATS_TTL", 3600, ValueError, "STATS_TTL must be longer than HOT_WINDOW, got 3600 and 3600"),
])
def test_a_bad_setting_fails_at_the_call_before_redis_or_the_model_is_touched(monkeypatch, setting, value, error,
                                                                              message):
    monkeypatch.setattr(cache, setting, value)
    call_fn = counting()
    with pytest.raises(error) as raised:
        cache.get_or_set(MSGS, "m", call_fn, client=Untouchable())
    assert message in str(raised.value)
    assert call_fn.calls == 0


class Answerer:
    def __call__(self):
        return ANSWER

    def ask(self):
        return ANSWER

    @classmethod
    def ask_class(cls):
        return ANSWER


def injecting(f):  # a decorator that supplies the argument its function needs
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(ANSWER, *args, **kwargs)
    return wrapper


def retrying(f):  # a pass-through decorator, around a method
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("call_fn", [
    lambda: ANSWER, lambda p=1: ANSWER, lambda *args, **kwargs: ANSWER, lambda *, p=1: ANSWER, Answerer().ask,
    Answerer(), functools.partial(dict, ANSWER), functools.partial(lambda a: a, ANSWER), Answerer.ask_class,
    injecting(lambda answer: answer), retrying(Answerer().ask), retrying(Answerer.ask_class),
], ids=["lambda", "default", "varargs", "keyword-default", "method", "object", "builtin-partial", "partial",
        "classmethod", "injecting-decorator", "decorated-method", "decorated-classmethod"])
def test_any_callable_taking_no_arguments_is_accepted(ask, client, call_fn):
    assert ask(MSGS, "m", call_fn, client=client) == ANSWER
    assert ask(MSGS, "m", counting("wrong"), client=client) == ANSWER


def test_the_largest_ttl_is_one_redis_accepts(ask, client, caplog):
    with caplog.at_level(logging.WARNING, logger="cache"):
        ask(MSGS, "m", counting(), ttl=cache._MAX_SECONDS, client=client)
    keys = cache._keys(MSGS, "m", None)
    assert client.ttl(keys[0]) > 10**15 and client.exists(keys[1]) == 0
    assert caplog.records == []


def test_a_deeply_nested_answer_is_a_type_error_and_stores_nothing(ask, client):
    with pytest.raises(TypeError) as raised:
        ask(MSGS, "m", lambda: nested(100_000), client=client)
    assert "not JSON" in str(raised.value)
    keys = cache._keys(MSGS, "m", None)
    assert client.exists(keys[0], keys[1]) == 0


def test_a_deeply_nested_corrupt_entry_is_a_miss(ask, client):
    entry = cache._keys(MSGS, "m", None)[0]
    client.hset(entry, mapping={"v": "[" * 100_000 + "]" * 100_000, "t": "3"})
    call_fn = counting()
    assert ask(MSGS, "m", call_fn, client=client) == ANSWER
    assert ask(MSGS, "m", call_fn, client=client) == ANSWER
    assert call_fn.calls == 1
    assert ask.stats(client=client) == {"hits": 1, "misses": 1, "tokens_saved": 23, "hit_rate": 0.5}


@pytest.mark.parametrize("url", ["notaurl", "", "redis://localhost:notaport", "redis://localhost?socket_timeout=-1",
                                 "redis://localhost?socket_connect_timeout=1e12"])
def test_a_malformed_redis_url_is_a_redis_that_is_down(ask, monkeypatch, caplog, url):
    monkeypatch.setenv("REDIS_URL", url)
    cache._from_url.cache_clear()
    call_fn = counting()
    with caplog.at_level(logging.WARNING, logger="cache"):
        assert ask(MSGS, "m", call_fn) == ANSWER
        assert ask(MSGS, "m", call_fn) == ANSWER
    assert call_fn.calls == 2
    assert [(r.levelname, "REDIS_URL" in r.message) for r in caplog.records] == [("ERROR", True)]
    with pytest.raises(ValueError) as raised:
        ask.stats()
    assert "REDIS_URL" in str(raised.value)


def test_the_demo_falls_back_to_fakeredis_on_a_malformed_redis_url():
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"} | {"REDIS_URL": "notaurl"}
    out = subprocess.run([sys.executable, "demo.py"], env=env, capture_output=True, text=True, timeout=120,
                         cwd=pathlib.Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Redis: REDIS_URL is not a Redis URL")
    assert "fakeredis in-process instead" in out.stdout.splitlines()[0]


class Tier(enum.IntEnum):
    HOT = 2


def test_an_int_subclass_is_a_setting_like_its_int(client, monkeypatch, caplog):
    monkeypatch.setattr(cache, "HOT_THRESHOLD", Tier.HOT)
    monkeypatch.setattr(cache, "HOT_TTL", 1000)
    call_fn = counting()
    with caplog.at_level(logging.WARNING, logger="cache"):
        for _ in range(3):
            cache.get_or_set(MSGS, "m", call_fn, ttl=100, client=client)
        cache.stats(client=client)  # sends the hits, which apply HOT_THRESHOLD
    assert call_fn.calls == 1 and caplog.records == []
    assert client.ttl(cache._keys(MSGS, "m", None)[0]) > 100


def test_redis_timeout_is_read_at_call_time(server, monkeypatch):
    monkeypatch.setenv("REDIS_URL", server.url)
    for timeout in (0.25, 0.75):
        monkeypatch.setattr(cache, "REDIS_TIMEOUT", timeout)
        cache.get_or_set(MSGS, "m", counting())
        kwargs = cache._redis(None).connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == timeout
    monkeypatch.setattr(cache, "REDIS_TIMEOUT", 0)
    with pytest.raises(ValueError) as raised:
        cache.get_or_set(MSGS, "m", counting())
    assert "REDIS_TIMEOUT must be from 0.001" in str(raised.value)


def test_unreachable_redis_is_answered_by_the_model_with_a_warning(ask, caplog):
    dead = redis.Redis(port=_free_port(), retry=None)  # refused at once, not retried
    call_fn = counting()
    with caplog.at_level(logging.WARNING, logger="cache"):
        assert ask(MSGS, "m", call_fn, client=dead) == ANSWER
        assert ask(MSGS, "m", call_fn, client=dead) == ANSWER
    assert call_fn.calls == 2
    assert len([r for r in caplog.records if "Redis failed" in r.message]) == 1  # once per outage


def test_stats_raise_when_redis_is_down(ask):
    with pytest.raises(redis.ConnectionError):
        ask.stats(client=redis.Redis(port=_free_port(), retry=None))  # refused at once, not retried


def test_a_fractional_lock_ttl_works(ask, client, monkeypatch):
    monkeypatch.setattr(cache, "LOCK_TTL", 1.5)
    lock = cache._keys(MSGS, "m", None)[1]
    seen = []

    def call_fn():
        seen.append(client.pttl(lock))
        return ANSWER

    assert ask(MSGS, "m", call_fn, client=client) == ANSWER
    assert ask(MSGS, "m", call_fn, client=client) == ANSWER
    assert len(seen) == 1 and 1000 < seen[0] <= 1500


def test_import_never_connects_and_needs_no_environment():
    probe = ("import socket\n"
             "def refuse(*a, **k): raise AssertionError('connected at import')\n"
             "socket.socket.connect = socket.create_connection = refuse\n"
             "import cache; print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LLM_CACHE_PREFIX")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_default_client_comes_from_redis_url_at_call_time(server, monkeypatch):
    monkeypatch.setenv("REDIS_URL", server.url)
    call_fn = counting()
    cache.get_or_set(MSGS, "m", call_fn)
    cache.get_or_set(MSGS, "m", call_fn)
    assert call_fn.calls == 1
    assert server.client().exists(cache._keys(MSGS, "m", None)[0]) == 1


# ---------------------------------------------------------------- single flight across processes

def _ask(url, start, results, sleep=0.3, value=ANSWER, messages=MSGS):
    """A worker process: wait for the start, then ask; its call_fn counts calls in Redis."""
    r = redis.Redis.from_url(url)

    def call_fn():
        r.incr(cache.PREFIX + "calls")
        time.sleep(sleep)
        return value

    start.wait()
    results.put(cache.get_or_set(messages, "m", call_fn, client=r))


def _run_processes(n, target, *args):
    return _run_workers([(target, args)] * n)


def _run_workers(workers):
    """Start a process per (target, args), release them together; return what each put in the results queue."""
    start, results = FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=target, args=(*args, start, results)) for target, args in workers]
    for p in procs:
        p.start()
    start.set()
    answers = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    return answers


def test_32_processes_asking_at_once_make_one_call(real_url):
    answers = _run_processes(32, _ask, real_url)
    assert answers == [ANSWER] * 32
    assert int(redis.Redis.from_url(real_url).get(cache.PREFIX + "calls")) == 1


def _rounds(url, rounds, barrier, start, results):
    r = redis.Redis.from_url(url)
    start.wait()
    got = []
    for n in range(rounds):
        barrier.wait(timeout=60)

        def call_fn(n=n):
            r.incr(f"{cache.PREFIX}calls:{n}")
            time.sleep(0.05)
            return {"round": n}

        got.append(cache.get_or_set([{"role": "user", "content": f"round {n}"}], "m", call_fn, client=r)["round"])
    results.put(got)


def test_64_processes_20_rounds_make_exactly_one_call_per_round(real_url):
    rounds = 20
    answers = _run_processes(64, _rounds, real_url, rounds, FORK.Barrier(64))
    assert answers == [list(range(rounds))] * 64
    r = redis.Redis.from_url(real_url)
    assert [int(r.get(f"{cache.PREFIX}calls:{n}")) for n in range(rounds)] == [1] * rounds


def _different(url, barrier, start, results):
    r = redis.Redis.from_url(url)
    me = os.getpid()

    def call_fn():
        barrier.wait(timeout=30)  # every call must be in flight at once, or this breaks
        return {"pid": me}

    start.wait()
    results.put(cache.get_or_set([{"role": "user", "content": str(me)}], "m", call_fn, client=r)["pid"])


def test_64_different_requests_are_not_serialized(real_url):
    pids = _run_processes(64, _different, real_url, FORK.Barrier(64))
    assert len(set(pids)) == 64  # each got its own answer, and all 64 calls overlapped (the barrier held)


# ---------------------------------------------------------------- round trips

def _tcp_commands(url, action):
    """The commands that action sends to the server as seen by MONITOR (commands run inside scripts left out)."""
    admin, marker = redis.Redis.from_url(url), redis.Redis.from_url(url)
    marker.ping()  # connected before MONITOR starts, so its handshake is not counted
    with admin.monitor() as m:
        action()
        marker.echo("end-of-action")
        seen = []
        while True:
            c = m.next_command()
            if "end-of-action" in c["command"]:
                return seen
            if c["client_type"] != "lua":
                seen.append(c["command"].split()[0].upper())


def test_a_hit_is_one_round_trip_and_a_miss_three(server):
    r = server.client()
    r.ping()
    cache.get_or_set(MSGS, "warm", counting(), client=r)  # loads the scripts
    with cache._SYNC.lock:  # the worker's: no flush of the hit's count falls into what is watched
        miss = _tcp_commands(server.url, lambda: cache.get_or_set(MSGS, "m", counting(), client=r))
        hit = _tcp_commands(server.url, lambda: cache.get_or_set(MSGS, "m", counting(), client=r))
    assert hit == ["HGET"]  # the value only: the hit count is sent later, with others, by the worker
    assert miss == ["HGET", "EVALSHA", "EVALSHA"]  # look up; look up again and lock; store, release and wake
    flush = _tcp_commands(server.url, lambda: cache.stats(client=r))
    assert flush.count("EVAL") == 1  # the hit's count, its hot window and the statistics, in one script


# ---------------------------------------------------------------- waiting

def test_waiters_wake_when_the_answer_is_stored_not_when_they_poll(server):
    release = threading.Event()
    r = server.client()
    cache.get_or_set(MSGS, "warm", counting(), client=r)  # loads the scripts

    def slow():
        release.wait(timeout=30)
        return ANSWER

    holder = threading.Thread(target=cache.get_or_set, args=(MSGS, "m", slow), kwargs={"client": r})
    holder.start()
    while not r.exists(cache._keys(MSGS, "m", None)[1]):
        time.sleep(0.01)
    waiter_results = []
    waiter = threading.Thread(target=lambda: waiter_results.append(
        cache.get_or_set(MSGS, "m", counting("wrong"), client=server.client(socket_timeout=10))))  # 5 s slices
    waiter.start()
    time.sleep(0.5)  # let the waiter block
    commands = _tcp_commands(server.url, lambda: (release.set(), holder.join(), waiter.join()))
    assert waiter_results == [ANSWER]
    # the holder stores once; the woken waiter reads once: no polling traffic in between
    assert commands.count("EVALSHA") == 2
    assert commands.count("XREAD") <= 1


# ---------------------------------------------------------------- slow calls, threads and pools

def _ask_slow(url, sleep, start, results):
    _ask(url, start, results, sleep=sleep)


def test_a_call_four_times_the_lock_ttl_is_made_once_for_eight_processes(real_url, monkeypatch):
    monkeypatch.setattr(cache, "LOCK_TTL", 1)  # the forked workers inherit it
    answers = _run_processes(8, _ask_slow, real_url, 4.0)
    assert answers == [ANSWER] * 8
    assert int(redis.Redis.from_url(real_url).get(cache.PREFIX + "calls")) == 1


@pytest.mark.parametrize("pool_class", [redis.ConnectionPool, redis.BlockingConnectionPool])
def test_32_threads_on_a_4_connection_pool_make_one_call(server, pool_class, caplog):
    r = redis.Redis(connection_pool=pool_class(port=server.port, max_connections=4))
    calls = []

    def call_fn():
        calls.append(1)
        time.sleep(0.5)
        return ANSWER

    with caplog.at_level(logging.WARNING, logger="cache"):
        answers = _in_threads(32, lambda: cache.get_or_set(MSGS, "m", call_fn, client=r))
    assert answers == [ANSWER] * 32
    assert len(calls) == 1
    assert len({id(a) for a in answers}) == 32  # each caller gets an answer of its own to change
    assert caplog.records == []
    assert cache.stats(client=r) == {"hits": 31, "misses": 1, "tokens_saved": 31 * 23, "hit_rate": 31 / 32}


def test_an_exhausted_pool_is_waited_on_not_taken_for_an_outage(server, caplog):
    r = redis.Redis(connection_pool=redis.ConnectionPool(port=server.port, max_connections=2))
    questions = iter(range(16))
    lock = threading.Lock()

    def ask():
        with lock:
            n = next(questions)
        answer = {"n": n, "usage": {"total_tokens": 1}}
        return cache.get_or_set([{"role": "user", "content": f"q{n}"}], "m", lambda: answer, client=r)["n"]

    with caplog.at_level(logging.WARNING, logger="cache"):
        assert sorted(_in_threads(16, ask)) == list(range(16))  # 16 lookups at once over 2 connections
        questions = iter(range(16))
        assert sorted(_in_threads(16, ask)) == list(range(16))
    assert caplog.records == []
    assert cache.stats(client=r) == {"hits": 16, "misses": 16, "tokens_saved": 16, "hit_rate": 0.5}


def test_waiters_hold_no_pooled_connection(server, caplog):
    release = threading.Event()
    questions = [[{"role": "user", "content": f"held {n}"}] for n in range(8)]
    elsewhere = server.client()  # another worker holds all eight locks

    def slow():
        release.wait(timeout=30)
        return ANSWER

    holders = [threading.Thread(target=cache.get_or_set, args=(q, "m", slow), kwargs={"client": elsewhere})
               for q in questions]
    for h in holders:
        h.start()
    _until(lambda: sum(elsewhere.exists(cache._keys(q, "m", None)[1]) for q in questions) == 8)
    r = redis.Redis(connection_pool=redis.ConnectionPool(port=server.port, max_connections=2, client_name="ours"))
    answers = []
    waiters = [threading.Thread(target=lambda q=q: answers.append(cache.get_or_set(q, "m", counting("x"), client=r)))
               for q in questions]
    with caplog.at_level(logging.WARNING, logger="cache"):
        for w in waiters:
            w.start()
        # two block on connections of their own (no more than the pool may open), the other six poll
        _until(lambda: sum(c["cmd"] == "xread" for c in elsewhere.client_list()) == 2)
        call_fn = counting()
        assert cache.get_or_set(MSGS, "m", call_fn, client=r) == ANSWER  # the 2-connection pool is free:
        assert cache.get_or_set(MSGS, "m", call_fn, client=r) == ANSWER  # a store and a hit go through at once
        assert call_fn.calls == 1
        assert sum(c["name"] == "ours" for c in elsewhere.client_list()) <= 4  # the pool's two, the waiters' two
        release.set()
        for t in holders + waiters:
            t.join(timeout=30)
    assert answers == [ANSWER] * 8
    assert caplog.records == []


def test_a_failed_call_raises_in_every_thread_that_waited_for_it(client):
    boom, calls = RuntimeError("model down"), []

    def failing():
        calls.append(1)
        time.sleep(0.5)
        raise boom

    outcomes = _in_threads(6, lambda: cache.get_or_set(MSGS, "m", failing, client=client))
    assert len(calls) == 1
    assert len(outcomes) == 6 and all(type(e) is RuntimeError and e.args == boom.args for e in outcomes)
    keys = cache._keys(MSGS, "m", None)
    assert client.exists(keys[0], keys[1]) == 0
    call_fn = counting()
    assert cache.get_or_set(MSGS, "m", call_fn, client=client) == ANSWER  # the next caller calls at once
    assert call_fn.calls == 1


class ModelError(Exception):
    """An exception whose __init__ formats its message, as SDKs' exceptions do."""

    def __init__(self, status):
        super().__init__(f"the model answered {status}")
        self.status = status


def test_threads_waiting_on_a_leader_that_fails_raise_its_very_exception(client):
    error, calls = ModelError(503), []

    def failing():
        calls.append(1)
        time.sleep(0.5)  # the other threads join its flight meanwhile
        raise error

    outcomes = _in_threads(6, lambda: cache.get_or_set(MSGS, "m", failing, client=client))
    assert len(calls) == 1 and len(outcomes) == 6
    assert [str(e) for e in outcomes] == ["the model answered 503"] * 6
    assert all(e is error for e in outcomes)


def test_a_waiter_calls_itself_after_max_wait_and_the_first_answer_stored_wins(client, monkeypatch):
    monkeypatch.setattr(cache, "MAX_WAIT", 0.5)
    release, outcome = threading.Event(), {}
    holder_client, waiter_client = twin(client), twin(client)  # another worker holds the lock

    def slow():
        release.wait(timeout=30)
        return {"by": "holder"}

    holder = threading.Thread(target=lambda: outcome.update(holder=cache.get_or_set(MSGS, "m", slow,
                                                                                  client=holder_client)))
    holder.start()
    _until(lambda: client.exists(cache._keys(MSGS, "m", None)[1]))
    call_fn = counting({"by": "waiter"})
    assert cache.get_or_set(MSGS, "m", call_fn, client=waiter_client) == {"by": "waiter"}
    assert call_fn.calls == 1
    release.set()
    holder.join()
    assert outcome["holder"] == {"by": "waiter"}  # its own answer came second, so it was dropped
    assert cache.get_or_set(MSGS, "m", counting("wrong"), client=client) == {"by": "waiter"}
    assert cache.stats(client=client)["misses"] == 1


def test_threads_waiting_on_a_leader_share_the_call_it_makes_after_max_wait(client, monkeypatch):
    monkeypatch.setattr(cache, "MAX_WAIT", 0.5)
    holding, release, calls = threading.Event(), threading.Event(), []

    def held_by_another_worker():
        holding.set()
        release.wait(timeout=30)
        return {"by": "another worker"}

    def slow():
        calls.append(1)
        time.sleep(2 * cache.MAX_WAIT)  # a call that outlasts MAX_WAIT too
        return {"by": "this process"}

    holder = threading.Thread(target=cache.get_or_set, args=(MSGS, "m", held_by_another_worker),
                              kwargs={"client": twin(client)})  # a client of its own: not in this process's flight
    holder.start()
    assert holding.wait(timeout=30)
    try:
        answers = _in_threads(8, lambda: cache.get_or_set(MSGS, "m", slow, client=client))
    finally:
        release.set()
        holder.join(timeout=30)
    assert len(calls) == 1  # the leader's, after MAX_WAIT
    assert answers == [{"by": "this process"}] * 8


def test_the_first_answer_stored_wins_over_a_late_holder(client):
    lock = cache._keys(MSGS, "m", None)[1]
    first_may_finish, second_may_finish, calls, outcome = threading.Event(), threading.Event(), [], {}

    def first():
        calls.append("first")
        first_may_finish.wait(timeout=30)
        return {"by": "first"}

    def second():
        calls.append("second")
        second_may_finish.wait(timeout=30)
        return {"by": "second"}

    t1 = threading.Thread(target=lambda: outcome.update(first=cache.get_or_set(MSGS, "m", first, client=twin(client))))
    t1.start()
    _until(lambda: calls)
    client.delete(lock)  # the first holder loses its lock (evicted), so a second worker calls too
    t2 = threading.Thread(target=lambda: outcome.update(second=cache.get_or_set(MSGS, "m", second,
                                                                                client=twin(client))))
    t2.start()
    _until(lambda: len(calls) == 2)
    first_may_finish.set()
    t1.join()
    second_may_finish.set()
    t2.join()
    assert outcome == {"first": {"by": "first"}, "second": {"by": "first"}}  # one request, one answer
    assert cache.get_or_set(MSGS, "m", counting("wrong"), client=client) == {"by": "first"}
    stats = cache.stats(client=client)
    assert (stats["hits"], stats["misses"]) == (1, 1)  # the dropped answer is no miss


def test_a_lost_reply_to_the_lock_still_stores_and_releases(ask, server, caplog):
    direct = server.client()
    ask(MSGS, "warm", counting(), client=direct)  # loads the scripts
    lost = []

    def the_lock_reply(data):  # ":0" is the lookup's "you hold the lock"; hold back the first one
        if data == b":0\r\n" and not lost:
            lost.append(data)
            return True
        return False

    proxy = DelayingProxy(server.port, delay=0.5, when=the_lock_reply)
    retry = redis.retry.Retry(redis.backoff.NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    r = redis.Redis(port=proxy.port, socket_timeout=0.2, retry=retry)
    call_fn = counting()
    with caplog.at_level(logging.WARNING, logger="cache"):
        assert ask(MSGS, "m", call_fn, client=r) == ANSWER
    proxy.close()
    assert lost and call_fn.calls == 1
    assert [rec for rec in caplog.records if "TimeoutError" in rec.message]  # the reply was lost
    lock = cache._keys(MSGS, "m", None)[1]
    _until(lambda: direct.exists(lock) == 0)  # released (in the background: Redis just timed out on this caller)
    other = counting("called again")
    assert ask(MSGS, "m", other, client=direct) == ANSWER  # and the answer stored with it
    assert other.calls == 0


def test_a_call_fn_that_asks_for_its_own_request_does_not_wait_for_itself(client):
    inner = counting({"by": "inner"})
    outcome = {}

    def outer():
        outcome["inner"] = cache.get_or_set(MSGS, "m", inner, client=client)
        return {"by": "outer"}

    t = threading.Thread(target=lambda: outcome.update(outer=cache.get_or_set(MSGS, "m", outer, client=client)))
    t.start()
    t.join(timeout=20)  # MAX_WAIT is 15 minutes: waiting for itself would still be waiting
    assert not t.is_alive()
    assert outcome == {"inner": {"by": "inner"}, "outer": {"by": "inner"}} and inner.calls == 1


def test_a_call_fn_that_asks_for_its_own_request_from_a_thread_it_waits_for_does_not_wait_for_itself(client):
    inner = counting({"by": "inner"})
    pool = concurrent.futures.ThreadPoolExecutor(1)

    def outer():
        return pool.submit(lambda: cache.get_or_set(MSGS, "m", inner, client=client)).result(timeout=5)

    try:
        assert cache.get_or_set(MSGS, "m", outer, client=client) == {"by": "inner"}
    finally:
        pool.shutdown()
    assert inner.calls == 1


def _waiting_for_a_leader(thread):
    """Whether the thread waits in its process's single flight."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None and frame.f_code is not cache._wait.__code__:
        frame = frame.f_back
    return frame is not None


@pytest.mark.parametrize("kept", ["futures", "threads", "futures, its call in a pool"])
def test_a_leader_keeping_its_followers_futures_or_threads_is_still_waited_for(client, kept):
    started, followers, calls = threading.Event(), [], []

    def ask():
        assert started.wait(30)
        followers.append(threading.current_thread())
        return cache.get_or_set(MSGS, "m", model, client=client)

    def all_waiting():  # (not a lambda in model: its list of threads would be one of call_fn's locals)
        return len(followers) == 4 and all(map(_waiting_for_a_leader, followers))

    def model():
        calls.append(1)
        started.set()
        _until(all_waiting, timeout=10)
        return ANSWER

    if kept.startswith("futures"):  # scatter, then lead, then gather: the futures are in a list of the leader's
        sdk = concurrent.futures.ThreadPoolExecutor(1)  # the leader's call_fn waits on a future of its own
        call_fn = model if kept == "futures" else lambda: sdk.submit(model).result(30)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ask) for _ in range(4)]
            answers = [cache.get_or_set(MSGS, "m", call_fn, client=client)] + [f.result(30) for f in futures]
        sdk.shutdown()
    else:
        threads, answers = [threading.Thread(target=lambda: answers.append(ask())) for _ in range(4)], []
        for t in threads:
            t.start()
        answers.append(cache.get_or_set(MSGS, "m", model, client=client))
        for t in threads:
            t.join(30)
    assert answers == [ANSWER] * 5 and len(calls) == 1


@pytest.mark.parametrize("through", ["queue", "simple queue", "event", "polling"])
def test_a_call_fn_that_asks_for_its_own_request_from_a_thread_it_holds_and_waits_on_does_not_wait_for_itself(
        client, through):
    inner, outcome = counting({"by": "inner"}), {}

    def outer():  # the thread is in a local of call_fn, which waits on a queue, on an event it sets, or polls it
        answers, done = queue.SimpleQueue() if through == "simple queue" else queue.Queue(), threading.Event()
        helper = threading.Thread(target=lambda: (answers.put(cache.get_or_set(MSGS, "m", inner, client=client)),
                                                  done.set()))
        helper.start()
        if through == "event":
            assert done.wait(20)
        while through == "polling" and helper.is_alive():
            time.sleep(0.01)
        return answers.get(timeout=20)

    t = threading.Thread(target=lambda: outcome.update(outer=cache.get_or_set(MSGS, "m", outer, client=client)),
                         daemon=True)
    t.start()
    t.join(timeout=30)  # MAX_WAIT is 15 minutes: waiting for itself would still be waiting
    assert not t.is_alive()
    assert outcome == {"outer": {"by": "inner"}} and inner.calls == 1


def test_each_thread_raising_the_leaders_exception_raises_the_one_object_whose_traceback_leads_to_the_model(client):
    # singleflight: the followers re-raise the leader's very exception, not copies, so they share one traceback,
    # which each re-raise extends; what matters is that it still leads to the model's raise
    boom, outcomes, calls = RuntimeError("model down"), [], []

    def failing():
        calls.append(1)
        time.sleep(0.3)
        raise boom

    def ask():
        try:
            cache.get_or_set(MSGS, "m", failing, client=client)
        except RuntimeError as e:
            outcomes.append((e, [frame.name for frame in traceback.extract_tb(e.__traceback__)]))

    _in_threads(12, ask)
    assert len(outcomes) == 12 and len(calls) == 1
    assert all(e is boom for e, _ in outcomes)
    assert all(names[-1] == "failing" for _, names in outcomes)  # the model's raise is where each traceback ends


def test_no_thread_to_renew_the_lock_is_no_error(client, monkeypatch):
    def refuse(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    call_fn = counting()
    assert cache.get_or_set(MSGS, "m", call_fn, client=client) == ANSWER
    assert client.exists(cache._keys(MSGS, "m", None)[1]) == 0  # released
    assert cache.get_or_set(MSGS, "m", call_fn, client=client) == ANSWER and call_fn.calls == 1


def test_a_slow_link_does_not_time_a_waiter_out(server, caplog):
    proxy = DelayingProxy(server.port, delay=0.3, when=lambda data: True)  # every reply 0.3 s late
    far = redis.Redis(port=proxy.port, socket_timeout=0.5)  # each reply still comes within its timeout
    release, calls = threading.Event(), []

    def slow():
        calls.append(1)
        release.wait(timeout=30)
        return ANSWER

    holder = threading.Thread(target=cache.get_or_set, args=(MSGS, "m", slow), kwargs={"client": server.client()})
    holder.start()
    _until(lambda: calls)
    with caplog.at_level(logging.WARNING, logger="cache"):
        own = counting("the waiter called the model")
        waiter = threading.Thread(target=lambda: calls.append(cache.get_or_set(MSGS, "m", own, client=far)))
        waiter.start()
        time.sleep(3)  # the waiter connects, blocks and wakes several times, each reply 0.3 s late
        release.set()
        holder.join()
        waiter.join(timeout=30)
    proxy.close()
    assert calls == [1, ANSWER] and own.calls == 0  # one model call; the waiter got the holder's answer
    assert caplog.records == []


def test_a_server_refusing_waiters_connections_is_polled_not_taken_for_an_outage(tmp_path, caplog):
    s = Server(tmp_path, "--maxclients", "3")  # room for the holders' connection and the waiters' pool's two only
    try:
        holders = redis.Redis(connection_pool=redis.BlockingConnectionPool(port=s.port, max_connections=1))
        questions = [[{"role": "user", "content": f"held {n}"}] for n in range(8)]
        release, holding = threading.Event(), []

        def held(n):
            holding.append(n)
            release.wait(timeout=30)
            return {"n": n}

        # another worker holds all eight locks
        threads = [threading.Thread(target=cache.get_or_set, args=(q, "m", functools.partial(held, n)),
                                    kwargs={"client": holders}) for n, q in enumerate(questions)]
        for t in threads:
            t.start()
        _until(lambda: len(holding) == 8)
        r = redis.Redis(connection_pool=redis.BlockingConnectionPool(port=s.port, max_connections=2))
        pooled = [r.connection_pool.get_connection() for _ in range(2)]  # the pool's two, open before any waiter's
        for connection in pooled:
            r.connection_pool.release(connection)
        answers, call_fn = {}, counting("x")
        waiters = [threading.Thread(target=lambda n=n, q=q: answers.update({n: cache.get_or_set(q, "m", call_fn,
                                                                                              client=r)}))
                   for n, q in enumerate(questions)]
        with caplog.at_level(logging.WARNING, logger="cache"):
            for w in waiters:
                w.start()
            _until(lambda: holders.info("stats")["rejected_connections"] > 0)  # a waiter's own connection, refused
            release.set()  # the holder stores its answers
            for t in threads + waiters:
                t.join(timeout=30)
        assert answers == {n: {"n": n} for n in range(8)} and call_fn.calls == 0
        assert not [rec for rec in caplog.records if "Redis failed" in rec.message]
    finally:
        s.kill()


def test_waiters_whose_pool_connections_the_server_refuses_wait_for_the_holder(ask, tmp_path):
    s = Server(tmp_path, "--maxclients", "8")
    try:
        admin, release, calls = s.client(), threading.Event(), []
        admin.ping()

        def held_by_another_worker():
            calls.append("holder")
            release.wait(timeout=30)
            return ANSWER

        holder = threading.Thread(target=cache.get_or_set, args=(MSGS, "m", held_by_another_worker),
                                  kwargs={"client": s.client()})
        holder.start()
        _until(lambda: calls)
        r = s.client(retry=redis.retry.Retry(redis.backoff.NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))
        held = s.fill()  # no connection of r's pool is open yet, and none can be now
        refused = admin.info("stats")["rejected_connections"]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            waiters = [pool.submit(ask, MSGS, "m", lambda: calls.append("waiter") or "x", client=r) for _ in range(4)]
            # (more refusals than one call and the client's retry of it make)
            _until(lambda: admin.info("stats")["rejected_connections"] >= refused + 3 or all(w.done() for w in waiters))
            for connection in held:
                connection.close()
            release.set()
            answers = [w.result(timeout=30) for w in waiters]
        holder.join(timeout=30)
        assert answers == [ANSWER] * 4 and calls == ["holder"]
    finally:
        s.kill()


def test_a_stale_wake_up_does_not_make_a_waiter_spin(server):
    r = server.client()
    entry, lock, stream = cache._keys(MSGS, "m", None)[:3]
    r.set(lock, "another holder", px=1000)
    r.xadd(stream, {"stored": "1"})  # a late holder's wake-up, whose entry has expired since
    before = r.info("commandstats").get("cmdstat_xread", {}).get("calls", 0)
    call_fn = counting()
    assert cache.get_or_set(MSGS, "m", call_fn, client=server.client()) == ANSWER  # after the lock expires
    xreads = r.info("commandstats")["cmdstat_xread"]["calls"] - before
    assert call_fn.calls == 1 and xreads <= 5  # it slept on the stream; it did not read it over and over


def test_a_forked_child_does_not_wait_for_its_parents_threads(server):
    r, release = server.client(), threading.Event()
    holder = threading.Thread(target=cache.get_or_set,
                              args=(MSGS, "m", lambda: (release.wait(timeout=30), ANSWER)[1]), kwargs={"client": r})
    holder.start()
    _until(lambda: r.exists(cache._keys(MSGS, "m", None)[1]))
    results = FORK.Queue()
    # the child asks through the same client object, for the request the parent's thread is leading
    child = FORK.Process(target=lambda: results.put(cache.get_or_set(MSGS, "m", counting("wrong"), client=r)))
    child.start()
    time.sleep(0.3)
    release.set()
    holder.join()
    try:
        assert results.get(timeout=30) == ANSWER  # it waited on Redis, not on a thread it does not have
    finally:
        child.kill()


# ---------------------------------------------------------------- asyncio

def test_sync_and_async_callers_share_entries_and_statistics(client):
    loop, aclient, first = Loop(), async_twin(client), counting({"by": "sync"})
    try:
        assert cache.get_or_set(MSGS, "m", first, client=client) == {"by": "sync"}
        assert loop.run(cache.aget_or_set(MSGS, "m", counting("wrong"), client=aclient)) == {"by": "sync"}
        answer = loop.run(cache.aget_or_set(MSGS, "n", counting({"by": "async"}), client=aclient))
        assert cache.get_or_set(MSGS, "n", counting("wrong"), client=client) == answer == {"by": "async"}
        loop.run(cache.astats(client=aclient))  # each path sends its own hits: the loop's,
        cache.stats(client=client)  # and the threads'
        assert cache.stats(client=client) == loop.run(cache.astats(client=aclient))
        assert cache.stats(client=client)["hits"] == 2
    finally:
        loop.run(aclient.aclose())
        loop.close()


def test_threads_and_each_loop_without_redis_keep_to_their_own_flights(monkeypatch, caplog):
    monkeypatch.setenv("REDIS_URL", "notaurl")  # no client on any path: each has None for one
    started, release, outcome, loop = threading.Event(), threading.Event(), {}, Loop()

    def slow():
        started.set()
        release.wait(timeout=10)
        return {"by": "thread"}

    async def slow_task():
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        return {"by": "a task of another loop"}

    thread = threading.Thread(target=lambda: outcome.update(thread=cache.get_or_set(MSGS, "m", slow)))
    with caplog.at_level(logging.ERROR, logger="cache"):
        thread.start()
        started.wait(timeout=10)
        other = asyncio.run_coroutine_threadsafe(cache.aget_or_set(MSGS, "m", slow_task), loop.loop)
        time.sleep(0.1)  # that loop's task leads a flight of its own now
        outcome["task"] = asyncio.run(cache.aget_or_set(MSGS, "m", counting({"by": "task"})))
        release.set()
        thread.join(timeout=10)
        outcome["other"] = other.result(timeout=10)
    loop.close()
    assert outcome == {"thread": {"by": "thread"}, "task": {"by": "task"}, "other": {"by": "a task of another loop"}}


def _fork_and_ask_async(results):
    inherited = sum(len(chores.clients) for chores in cache._loop_chores.values())
    results.put((inherited, asyncio.run(cache.aget_or_set(MSGS, "m", counting("wrong")))))


def test_a_forked_child_makes_clients_of_its_own(server, monkeypatch):
    monkeypatch.setenv("REDIS_URL", server.url)
    parent = Loop()  # a loop the child inherits, with a client whose connection is the parent's
    try:
        assert parent.run(cache.aget_or_set(MSGS, "m", counting())) == ANSWER
        results = FORK.Queue()
        child = FORK.Process(target=_fork_and_ask_async, args=(results,))
        child.start()
        assert results.get(timeout=30) == (0, ANSWER)  # none of the parent's clients; the answer, from Redis
        child.join(timeout=10)
    finally:
        parent.close()


def test_a_loop_per_call_leaves_no_client_or_connection_behind(server, monkeypatch):
    monkeypatch.setenv("REDIS_URL", server.url)
    admin = server.client()
    for n in range(20):  # as a sync program calling asyncio.run per job does
        asyncio.run(cache.aget_or_set([{"role": "user", "content": str(n)}], "m", counting()))
    gc.collect()
    assert [len(chores.clients) for chores in cache._loop_chores.values()] == [1]  # the last loop's, until another
    assert len(admin.client_list()) <= 2  # this one, and the last loop's


def test_a_long_lived_loop_drops_the_clients_of_loops_closed_meanwhile(server, monkeypatch):
    monkeypatch.setenv("REDIS_URL", server.url)
    main = Loop()
    try:
        main.run(cache.aget_or_set(MSGS, "m", counting()))
        threads = [threading.Thread(target=asyncio.run, args=(cache.aget_or_set(MSGS, "m", counting()),))
                   for _ in range(5)]  # each runs a loop of its own, and closes it
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        main.run(cache.aget_or_set(MSGS, "m", counting()))
        assert list(cache._loop_chores) == [main.loop]
    finally:
        main.close()


def test_a_cancellation_during_the_store_still_stores_and_releases(ask_async_client, client):
    loop, aclient = ask_async_client
    keys = cache._keys(MSGS, "m", None)

    async def main():
        me = asyncio.current_task()

        def answer():  # the cancellation lands at the next step of the loop: in the store
            asyncio.get_running_loop().call_soon(me.cancel)
            return ANSWER

        await cache.aget_or_set(MSGS, "m", answer, client=aclient)

    with pytest.raises(concurrent.futures.CancelledError):
        loop.run(main())
    _until(lambda: client.exists(keys[1]) == 0 and client.exists(keys[0]) == 1)
    assert loop.run(cache.aget_or_set(MSGS, "m", counting("called again"), client=aclient)) == ANSWER


def test_followers_that_give_up_are_no_hits(ask_async_client, monkeypatch):
    loop, aclient = ask_async_client

    async def slow():
        await asyncio.sleep(1.0)  # ten times the followers' patience: a busy machine may stall the loop a while
        return ANSWER

    async def main():
        leader = asyncio.ensure_future(cache.aget_or_set(MSGS, "m", slow, client=aclient))
        await asyncio.sleep(0.05)
        gave_up = await asyncio.gather(*[asyncio.wait_for(cache.aget_or_set(MSGS, "m", slow, client=aclient), 0.1)
                                         for _ in range(10)], return_exceptions=True)
        return await leader, gave_up

    answer, gave_up = loop.run(main())
    assert answer == ANSWER and all(isinstance(g, asyncio.TimeoutError) for g in gave_up)
    stats = loop.run(cache.astats(client=aclient))
    assert (stats["hits"], stats["misses"], stats["tokens_saved"]) == (0, 1, 0)


def test_a_follower_in_the_process_waits_as_long_as_its_leader_and_takes_the_answer(ask_async_client, monkeypatch):
    # singleflight: a follower has no MAX_WAIT of its own (the leader's, against Redis, applies), so none gives up
    # and calls the model as the leader ends
    monkeypatch.setattr(cache, "MAX_WAIT", 0)
    loop, aclient = ask_async_client
    calls = []

    async def slow():
        calls.append(1)
        await asyncio.sleep(0.3)  # far longer than MAX_WAIT
        return ANSWER

    async def main():
        return await asyncio.gather(*[cache.aget_or_set(MSGS, "m", slow, client=aclient) for _ in range(2)])

    assert loop.run(main()) == [ANSWER, ANSWER]
    stats = loop.run(cache.astats(client=aclient))
    assert len(calls) == 1 and (stats["hits"], stats["misses"]) == (1, 1)  # the follower's answer is a hit


def test_a_connection_dropped_during_the_call_still_stores_and_releases(server, caplog):
    admin, keys = server.client(), cache._keys(MSGS, "m", None)

    async def main():
        r = redis.asyncio.Redis.from_url(server.url, client_name="app")  # as a user makes one: no retry of its own

        async def call_fn():
            await asyncio.sleep(0.05)
            for c in admin.client_list():  # a restart, or the server's idle timeout, during the call
                if c["name"] == "app":
                    admin.client_kill_filter(_id=c["id"])
            return ANSWER

        with caplog.at_level(logging.WARNING, logger="cache"):
            answer = await cache.aget_or_set(MSGS, "m", call_fn, client=r)
        await r.aclose()
        return answer

    assert asyncio.run(main()) == ANSWER
    assert admin.exists(keys[0]) == 1 and admin.exists(keys[1]) == 0
    assert not [rec for rec in caplog.records if "Redis failed" in rec.message]


def test_1000_tasks_make_one_call_through_one_redis_waiter(server):
    admin, keys = server.client(), cache._keys(MSGS, "m", None)
    admin.set(keys[1], "another worker", px=30_000)  # so the tasks wait in Redis, not only on each other
    waiters = []

    async def main():
        r, calls = redis.asyncio.Redis(port=server.port), []

        async def call_fn():
            calls.append(1)
            return ANSWER

        tasks = [asyncio.ensure_future(cache.aget_or_set(MSGS, "m", call_fn, client=r)) for _ in range(1000)]
        deadline = time.monotonic() + 20
        while not [c for c in admin.client_list() if c["cmd"] == "xread"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # (any other task that would wait in Redis too is there by now)
        waiters.append([c["cmd"] for c in admin.client_list()].count("xread"))
        run_script(admin, cache._FINISH, keys, "another worker", "", 0, 60_000, 10_000, 60_000, "",
                   int(time.time() * 1000))  # it failed
        answers = await asyncio.gather(*tasks)
        await cache.astats(client=r)  # (which sends the hits)
        await r.aclose()
        return answers, calls

    answers, calls = asyncio.run(main())
    assert waiters == [1]
    assert answers == [ANSWER] * 1000 and len(calls) == 1
    assert cache.stats(client=admin) == {"hits": 999, "misses": 1, "tokens_saved": 999 * 23, "hit_rate": 0.999}


def test_2000_tasks_asking_for_cached_answers_through_a_4_connection_pool_call_nothing(real_url):
    questions = [[{"role": "user", "content": f"question {n}"}] for n in range(2000)]
    calls = []

    def model():
        calls.append(1)
        return "called"

    async def main():
        filler = redis.asyncio.Redis(connection_pool=redis.asyncio.BlockingConnectionPool.from_url(real_url))
        r = redis.asyncio.Redis.from_url(real_url, max_connections=4)
        try:
            await asyncio.gather(*[cache.aget_or_set(question, "m", lambda n=n: {"n": n}, client=filler)
                                   for n, question in enumerate(questions)])
            await cache.astats(client=filler)  # (which finishes the stores)
            answers = await asyncio.gather(*[cache.aget_or_set(q, "m", model, client=r) for q in questions])
            return answers, await cache.astats(client=r)
        finally:
            await filler.aclose()
            await r.aclose()

    answers, stats = asyncio.run(main())
    assert calls == [] and answers == [{"n": n} for n in range(2000)]
    assert (stats["hits"], stats["misses"]) == (2000, 2000)


def test_200_different_requests_at_once_are_not_serialized(ask_async_client):
    loop, aclient = ask_async_client
    started, everyone = [], asyncio.Event()

    async def call_fn(n):
        started.append(n)
        if len(started) == 200:
            everyone.set()
        await asyncio.wait_for(everyone.wait(), 20)  # serialized calls would never all be under way at once
        return {"n": n}

    async def main():
        return await asyncio.gather(*[cache.aget_or_set([{"role": "user", "content": str(n)}], "m",
                                                        functools.partial(call_fn, n), client=aclient)
                                      for n in range(200)])

    assert loop.run(main()) == [{"n": n} for n in range(200)]


def test_a_cancelled_leader_releases_its_lock_at_once_and_leaves_no_task(ask_async_client, client):
    loop, aclient = ask_async_client
    lock = cache._keys(MSGS, "m", None)[1]
    in_call = []

    async def hanging():
        in_call.append(1)
        await asyncio.sleep(60)

    async def main():
        leader = asyncio.ensure_future(cache.aget_or_set(MSGS, "m", hanging, client=aclient))
        while not in_call:  # it leads (a follower started with it might have led instead: its lookup came back first)
            await asyncio.sleep(0.01)
        follower = asyncio.ensure_future(cache.aget_or_set(MSGS, "m", counting(), client=aclient))
        held = client.exists(lock)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        released = client.exists(lock) == 0 or await follower  # the follower may already hold it, as the leader
        answer = await follower  # not cancelled: it leads in turn
        deadline = time.monotonic() + 10  # the loop's worker task ends once it has nothing left to do
        while (left := [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]) and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return held, released, answer, left

    held, released, answer, left = loop.run(main())
    assert held == 1 and released and answer == ANSWER
    assert left == []


def test_a_cancelled_waiter_closes_its_connection(server):
    admin = server.client()
    admin.set(cache._keys(MSGS, "m", None)[1], "another worker", px=30_000)

    async def main():
        r = redis.asyncio.Redis(port=server.port)
        task = asyncio.ensure_future(cache.aget_or_set(MSGS, "m", counting(), client=r))
        await asyncio.sleep(0.3)
        during = admin.client_list()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
        after = admin.client_list()
        await r.aclose()
        return during, after

    during, after = asyncio.run(main())
    assert [c["cmd"] for c in during].count("xread") == 1
    assert [c["cmd"] for c in after].count("xread") == 0 and len(after) < len(during)


def test_a_call_fn_task_that_asks_for_its_own_request_does_not_wait_for_itself(ask_async_client):
    loop, aclient = ask_async_client
    inner, outcome = counting({"by": "inner"}), {}

    async def outer():
        outcome["inner"] = await cache.aget_or_set(MSGS, "m", inner, client=aclient)
        return {"by": "outer"}

    outcome["outer"] = loop.run(cache.aget_or_set(MSGS, "m", outer, client=aclient), timeout=20)
    assert outcome == {"inner": {"by": "inner"}, "outer": {"by": "inner"}} and inner.calls == 1


@pytest.mark.parametrize("child", ["wait_for", "gather"])
def test_a_call_fn_that_asks_for_its_own_request_from_a_child_task_does_not_wait_for_itself(ask_async_client, child):
    loop, aclient = ask_async_client
    inner = counting({"by": "inner"})

    async def outer():
        asking = cache.aget_or_set(MSGS, "m", inner, client=aclient)
        if child == "wait_for":
            return await asyncio.wait_for(asking, 5)  # (a task of its own before Python 3.12)
        return (await asyncio.gather(asking))[0]

    assert loop.run(cache.aget_or_set(MSGS, "m", outer, client=aclient), timeout=10) == {"by": "inner"}
    assert inner.calls == 1


def test_a_failed_call_raises_in_every_task_that_waited_for_it(ask_async_client):
    loop, aclient = ask_async_client
    calls = []

    async def failing():
        calls.append(1)
        await asyncio.sleep(0.1)
        raise RuntimeError("model down")

    async def main():
        return await asyncio.gather(*[cache.aget_or_set(MSGS, "m", failing, client=aclient) for _ in range(20)],
                                    return_exceptions=True)

    outcomes = loop.run(main())
    assert len(calls) == 1
    assert all(isinstance(o, RuntimeError) and str(o) == "model down" for o in outcomes)


def test_the_default_async_client_is_one_per_event_loop(server, monkeypatch):
    monkeypatch.setenv("REDIS_URL", server.url)

    async def clients():
        await cache.aget_or_set(MSGS, "m", counting())
        return cache._redis(None, sync=False), cache._redis(None, sync=False)

    first, second = asyncio.run(clients()), asyncio.run(clients())
    assert first[0] is first[1] and second[0] is second[1] and first[0] is not second[0]
    assert isinstance(first[0], redis.asyncio.Redis)
    assert first[0].connection_pool.connection_kwargs["socket_timeout"] == cache.REDIS_TIMEOUT


class AsyncUntouchable(redis.asyncio.Redis):
    """A redis.asyncio client that fails the test on any command."""

    def __init__(self):
        pass

    async def execute_command(self, *args, **options):
        raise AssertionError(f"Redis was touched: {args[0]}")


@pytest.mark.parametrize("client, message", [
    (redis.Redis(), "client must be a redis.asyncio.Redis or redis.asyncio.RedisCluster, got Redis"),
    (redis.asyncio.Redis().pipeline(), "client must be a redis.asyncio.Redis or redis.asyncio.RedisCluster, got "
                                       "Pipeline"),
    (AsyncUntouchable(), "call_fn must be a callable taking no arguments"),
])
def test_bad_arguments_to_aget_or_set_fail_before_redis_or_the_model_is_touched(client, message):
    async def needy(question):
        return ANSWER

    call_fn = counting() if "client" in message else needy
    with pytest.raises(TypeError) as raised:
        asyncio.run(cache.aget_or_set(MSGS, "m", call_fn, client=client))
    assert message in str(raised.value)


def _ask_async(url, tasks, start, results):
    """A worker process of asyncio tasks: wait for the start, then each task asks; calls are counted in Redis."""
    async def main():
        r = redis.asyncio.Redis.from_url(url)

        async def call_fn():
            await r.incr(cache.PREFIX + "calls")
            await asyncio.sleep(0.3)
            return ANSWER

        answers = await asyncio.gather(*[cache.aget_or_set(MSGS, "m", call_fn, client=r) for _ in range(tasks)])
        await r.aclose()
        return answers

    start.wait()
    results.put(asyncio.run(main()))


def _ask_threads(url, threads, start, results):
    """A worker process of threads: wait for the start, then each thread asks; calls are counted in Redis."""
    r = redis.Redis.from_url(url)

    def call_fn():
        r.incr(cache.PREFIX + "calls")
        time.sleep(0.3)
        return ANSWER

    start.wait()
    results.put(_in_threads(threads, lambda: cache.get_or_set(MSGS, "m", call_fn, client=r)))


def test_tasks_in_8_processes_and_threads_in_another_make_one_call(real_url):
    answers = _run_workers([(_ask_async, (real_url, 50))] * 8 + [(_ask_threads, (real_url, 16))])
    assert sorted(len(a) for a in answers) == [16] + [50] * 8
    assert all(answer == ANSWER for a in answers for answer in a)
    assert int(redis.Redis.from_url(real_url).get(cache.PREFIX + "calls")) == 1


# ---------------------------------------------------------------- faults

def _hold_forever(url, lock_ttl, start, results):
    cache.LOCK_TTL = lock_ttl
    r = redis.Redis.from_url(url)

    def call_fn():
        r.incr(cache.PREFIX + "calls")
        time.sleep(3600)

    start.wait()
    cache.get_or_set(MSGS, "m", call_fn, client=r)


def test_a_killed_holder_costs_one_more_call_and_no_hang(ask, server, monkeypatch):
    monkeypatch.setattr(cache, "LOCK_TTL", 1)
    r = server.client()
    start, results = FORK.Event(), FORK.Queue()
    holder = FORK.Process(target=_hold_forever, args=(server.url, 1, start, results))
    holder.start()
    start.set()
    while r.get(cache.PREFIX + "calls") is None:
        time.sleep(0.01)
    waiters = [FORK.Process(target=_ask, args=(server.url, start, results, 0.2, {"second": True})) for _ in range(8)]
    for w in waiters:
        w.start()
    time.sleep(1.5)  # longer than LOCK_TTL: the live holder's renewals keep its lock
    assert int(r.get(cache.PREFIX + "calls")) == 1 and r.exists(cache._keys(MSGS, "m", None)[1]) == 1
    holder.kill()
    answers = [results.get(timeout=30) for _ in waiters]
    assert answers == [{"second": True}] * 8
    assert int(r.get(cache.PREFIX + "calls")) == 2
    assert r.exists(cache._keys(MSGS, "m", None)[1]) == 0  # no lock left behind


def test_a_holder_that_lost_its_lock_cannot_release_its_successors(client, monkeypatch):
    monkeypatch.setattr(cache, "LOCK_TTL", 1)
    lock = cache._keys(MSGS, "m", None)[1]
    first_may_fail, second_may_finish = threading.Event(), threading.Event()
    calls = []

    def first():
        calls.append("first")
        first_may_fail.wait(timeout=30)
        raise TimeoutError("model took too long")

    def second():
        calls.append("second")
        second_may_finish.wait(timeout=30)
        return {"by": "second"}

    outcome = {}

    def run(name, fn):
        try:
            outcome[name] = cache.get_or_set(MSGS, "m", fn, client=twin(client))
        except Exception as e:
            outcome[name] = e

    t1 = threading.Thread(target=run, args=("first", first))
    t1.start()
    while not calls:
        time.sleep(0.01)
    client.delete(lock)  # evicted under the first holder, which renews it no more
    t2 = threading.Thread(target=run, args=("second", second))
    t2.start()
    while len(calls) < 2:
        time.sleep(0.01)
    time.sleep(0.5)  # the first holder's renewal comes round and finds the lock is not its own
    first_may_fail.set()
    t1.join()
    assert isinstance(outcome["first"], TimeoutError)
    assert client.exists(lock) == 1  # the failed first holder left the second's lock alone
    t3 = threading.Thread(target=run, args=("third", counting("third called the model")))
    t3.start()
    time.sleep(0.3)
    assert "third" not in outcome  # it waits for the second holder
    second_may_finish.set()
    t2.join()
    t3.join()
    assert outcome["second"] == outcome["third"] == {"by": "second"}
    assert calls == ["first", "second"]


def test_an_evicted_lock_costs_at_most_a_duplicate_call(ask, client, monkeypatch):
    monkeypatch.setattr(cache, "LOCK_TTL", 1)  # waiters find the lock gone at their next wake, within a second
    release = threading.Event()
    calls = []

    def slow():
        calls.append(1)
        release.wait(timeout=30)
        return ANSWER

    threads = [threading.Thread(target=cache.get_or_set, args=(MSGS, "m", slow), kwargs={"client": twin(client)})
               for _ in range(3)]
    threads[0].start()
    while not calls:
        time.sleep(0.01)
    for t in threads[1:]:
        t.start()
    time.sleep(0.2)
    client.delete(cache._keys(MSGS, "m", None)[1])  # what allkeys-lru does to a lock under memory pressure
    while len(calls) < 2:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert len(calls) == 2
    assert ask(MSGS, "m", counting("not cached"), client=client) == ANSWER
    assert ask.stats(client=client)["misses"] == 1  # the first answer stored won; the second was dropped


def test_frozen_redis_costs_one_timeout_per_outage_and_caching_resumes(ask, server, monkeypatch, caplog):
    monkeypatch.setenv("REDIS_URL", server.url)  # the module's own client, with its short timeouts
    monkeypatch.setattr(cache, "RETRY_AFTER", 0.5)
    ask(MSGS, "m", counting())
    server.freeze()
    call_fn = counting({"fresh": True})
    with caplog.at_level(logging.WARNING, logger="cache"):
        answers = [ask(MSGS, "m", call_fn) for _ in range(100)]
    assert answers == [{"fresh": True}] * 100 and call_fn.calls == 100
    assert len([r for r in caplog.records if "Redis failed" in r.message]) == 1
    server.thaw()
    for attempt in range(100):  # caching resumes on its own, a RETRY_AFTER later
        call_fn = counting()
        question = [{"role": "user", "content": f"after the outage, attempt {attempt}"}]
        ask(question, "m", call_fn)
        ask(question, "m", call_fn)
        if call_fn.calls == 1:
            break
        time.sleep(0.1)
    assert call_fn.calls == 1


def test_a_restarted_redis_is_used_again_at_once(ask, server, monkeypatch, caplog):
    monkeypatch.setenv("REDIS_URL", server.url)
    call_fn = counting()
    ask(MSGS, "m", call_fn)
    server.kill()
    server.start()
    with caplog.at_level(logging.WARNING, logger="cache"):
        ask(MSGS, "m", call_fn)  # the server lost its data; the stale connection is redialled
        ask(MSGS, "m", call_fn)
    assert call_fn.calls == 2
    assert not [r for r in caplog.records if "Redis failed" in r.message]


def test_out_of_memory_is_not_an_outage(ask, server, caplog):
    r = server.client()
    ask(MSGS, "cached", counting(), client=r)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)
    call_fn = counting()
    with caplog.at_level(logging.WARNING, logger="cache"):
        assert ask(MSGS, "cached", call_fn, client=r) == ANSWER
        assert call_fn.calls == 0  # a hit still served
        assert ask(MSGS, "new", call_fn, client=r) == ANSWER
        assert ask(MSGS, "new", call_fn, client=r) == ANSWER
        assert call_fn.calls == 2  # misses answered by call_fn, uncached
        for _ in range(5):  # Redis answered, so it is not skipped: the cached request is still a hit
            assert ask(MSGS, "cached", call_fn, client=r) == ANSWER
    assert call_fn.calls == 2
    assert not [r for r in caplog.records if "Redis failed" in r.message]  # no outage declared
    refusals = [r.message for r in caplog.records if "Redis refused" in r.message]
    assert len(refusals) == 1 and "maxmemory" in refusals[0]


def test_a_store_refused_for_want_of_memory_still_releases_the_lock(ask, server):
    r = server.client()
    r.config_set("maxmemory-policy", "noeviction")
    entry, lock = cache._keys(MSGS, "m", None)[:2]

    def call_fn():
        r.config_set("maxmemory", 1)  # full while the model answers
        return ANSWER

    assert ask(MSGS, "m", call_fn, client=r) == ANSWER
    assert r.exists(entry, lock) == 0  # nothing stored, and the waiters elsewhere woken to ask again


def test_a_store_that_gets_no_connection_within_lock_ttl_is_given_up_once(server, monkeypatch):
    monkeypatch.setattr(cache, "LOCK_TTL", 1)  # the longest a store waits for a connection
    r = server.client(max_connections=1)
    entry = cache._keys(MSGS, "m", None)[0]

    def call_fn():
        held = r.connection_pool.get_connection()  # another user's, for half a LOCK_TTL past the store's wait
        threading.Timer(1.5, r.connection_pool.release, [held]).start()
        return ANSWER

    assert cache.get_or_set(MSGS, "m", call_fn, client=r) == ANSWER
    time.sleep(1.6)
    assert r.exists(entry) == 0  # not stored by a second try, which would have waited another LOCK_TTL


class DelayingProxy:
    """A TCP proxy to Redis that holds some replies back longer than the client's socket timeout."""

    def __init__(self, upstream_port, delay, when):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port, self.upstream, self.delay, self.when = self.listener.getsockname()[1], upstream_port, delay, when
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                down, _ = self.listener.accept()
                up = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:  # closed, or its server is gone with the test
                return
            threading.Thread(target=self._pipe, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, True), daemon=True).start()

    def _pipe(self, src, dst, slow):
        try:
            while data := src.recv(65536):
                if slow and self.when(data):
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def close(self):
        self.listener.close()


def test_replies_delayed_past_the_timeout_never_give_a_wrong_answer(ask, server, monkeypatch):
    monkeypatch.setattr(cache, "RETRY_AFTER", 0)  # try Redis on every call, so every call crosses the proxy
    rng = random.Random(7)
    proxy = DelayingProxy(server.port, delay=0.08, when=lambda data: rng.random() < 0.03)
    retry = redis.retry.Retry(redis.backoff.NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    r = redis.Redis(port=proxy.port, socket_timeout=0.05, retry=retry)
    questions = random.Random(1)
    wrong = []
    for _ in range(1000):
        n = questions.randrange(50)
        got = ask([{"role": "user", "content": f"question {n}"}], "m", lambda n=n: {"n": n}, client=r)
        if got != {"n": n}:
            wrong.append((n, got))
    proxy.close()
    assert wrong == []


# ---------------------------------------------------------------- authentication

def test_password_and_acl_user_urls_work_and_a_wrong_password_fails_open(ask, tmp_path, monkeypatch, caplog):
    s = Server(tmp_path, "--requirepass", "s3cret")
    try:
        # the least-privilege user the README recommends, limited to this test's prefix
        s.client(password="s3cret").acl_setuser("app", enabled=True, passwords=["+app-pass"], keys=[f"{cache.PREFIX}*"],
                                                categories=["+@read", "+@write", "+@scripting", "+@stream",
                                                            "+@connection", "-@dangerous"])
        for url in (f"redis://app:app-pass@127.0.0.1:{s.port}/0", f"redis://:s3cret@127.0.0.1:{s.port}/0"):
            monkeypatch.setenv("REDIS_URL", url)  # the ACL user first, so it loads the scripts itself
            call_fn = counting()
            ask(MSGS, url, call_fn)
            ask(MSGS, url, call_fn)
            assert call_fn.calls == 1
            assert ask.stats()["hits"] >= 1
        monkeypatch.setenv("REDIS_URL", f"redis://app:wrong@127.0.0.1:{s.port}/0")
        call_fn = counting()
        with caplog.at_level(logging.WARNING, logger="cache"):
            assert ask(MSGS, "m", call_fn) == ANSWER
            assert ask(MSGS, "m", call_fn) == ANSWER
        assert call_fn.calls == 2
        failures = [r.message for r in caplog.records if "Redis failed" in r.message]
        assert len(failures) == 1 and "AuthenticationError" in failures[0]
    finally:
        s.kill()


class Exploit:
    """Unpickling this creates a file: the classic poisoned-cache payload."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_poisoned_pickle_entry_is_never_executed(client, tmp_path):
    import pickle

    planted = tmp_path / "pwned"
    client.hset(cache._keys(MSGS, "m", None)[0], mapping={"v": pickle.dumps(Exploit(str(planted))), "t": "0"})
    call_fn = counting()
    assert cache.get_or_set(MSGS, "m", call_fn, client=client) == ANSWER  # a corrupt entry: a miss, overwritten
    assert call_fn.calls == 1
    assert not planted.exists()


# ---------------------------------------------------------------- Redis Cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not shutil.which("redis-cli"):
        _need("no redis-cli on PATH to create a cluster")
    nodes = []
    try:
        for _ in range(3):
            # a node timeout of 3 s, not 15: the nodes agree on the cluster in a second, not ten
            nodes.append(Server(tmp_path_factory.mktemp("node"), "--cluster-enabled", "yes", "--cluster-node-timeout",
                                "3000"))
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        for _ in range(200):
            if all(n.client().execute_command("CLUSTER INFO")["cluster_state"] == "ok" for n in nodes):
                break
            time.sleep(0.05)
        c = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port)
        yield c, nodes
        c.close()
    finally:
        for n in nodes:
            n.kill()


def test_cluster_core_behaviour_without_crossslot(ask, cluster, caplog):
    c, nodes = cluster
    with caplog.at_level(logging.WARNING, logger="cache"):
        for n in range(60):
            answer = {"n": n, "usage": {"total_tokens": 10 + n}}
            call_fn = counting(answer)
            messages = [{"role": "user", "content": f"question {n}"}]
            assert ask(messages, "gpt-4", call_fn, client=c) == answer
            assert ask(messages, "gpt-4", call_fn, client=c) == answer
            assert call_fn.calls == 1
    assert not caplog.records  # no CROSSSLOT, no fail-open
    counts = [len(n.client().keys(cache.PREFIX + "*")) for n in nodes]
    assert all(count > 0 for count in counts)  # entries spread over all three masters
    tokens = sum(10 + n for n in range(60))
    assert ask.stats(client=c) == {"hits": 60, "misses": 60, "tokens_saved": tokens, "hit_rate": 0.5}


def test_cluster_streams_are_followed_live_and_replayed(cluster):
    cluster, _ = cluster
    gates = [threading.Event() for _ in CHUNKS]
    gates[0].set()
    model = Model(gates=gates)
    leader = cache.get_or_set(MSGS, "m", model, client=cluster)
    assert next(leader) == CHUNKS[0]
    follower = elsewhere(lambda: cache.get_or_set(MSGS, "m", model, client=cluster))
    assert next(follower) == CHUNKS[0]
    for gate in gates[1:]:
        gate.set()
    assert list(leader) == list(follower) == CHUNKS[1:]
    assert list(cache.get_or_set(MSGS, "m", model, client=cluster)) == CHUNKS and model.calls == 1


def _ask_cluster(port, start, results):
    c = redis.RedisCluster(host="127.0.0.1", port=port)

    def call_fn():
        c.incr(cache.PREFIX + "calls")
        time.sleep(0.3)
        return ANSWER

    start.wait()
    results.put(cache.get_or_set(MSGS, "m", call_fn, client=c))


def test_cluster_single_flight_is_one_call(cluster):
    c, nodes = cluster
    answers = _run_processes(16, _ask_cluster, nodes[0].port)
    assert answers == [ANSWER] * 16
    assert int(c.get(cache.PREFIX + "calls")) == 1


def test_async_cluster_waiters_get_the_answer_stored_while_they_wait(cluster):
    c, nodes = cluster
    keys = cache._keys(MSGS, "m", None)
    c.set(keys[1], "another worker", px=30_000)

    async def main():
        r = redis.asyncio.RedisCluster(host="127.0.0.1", port=nodes[0].port)
        tasks = [asyncio.ensure_future(cache.aget_or_set(MSGS, "m", counting("called"), client=r)) for _ in range(3)]
        await asyncio.sleep(0.3)
        run_script(c, cache._FINISH, keys, "another worker", json.dumps(ANSWER), 0, 60_000, 10_000, 60_000, "",
                   int(time.time() * 1000))
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 20)  # before the lock (30 s) runs out
        await r.aclose()
        return answers

    assert asyncio.run(main()) == [ANSWER] * 3


# ---------------------------------------------------------------- statistics

def test_stats_count_hits_misses_and_tokens_saved(ask, client):
    assert ask.stats(client=client) == {"hits": 0, "misses": 0, "tokens_saved": 0, "hit_rate": 0.0}
    for _ in range(4):
        ask(MSGS, "gpt-4", counting(), client=client)  # one miss, three hits of 23 tokens
    ask(MSGS, "other", counting("x"), client=client)
    expected_tokens = 3 * ANSWER["usage"]["total_tokens"]
    assert ask.stats(client=client) == {"hits": 3, "misses": 2, "tokens_saved": expected_tokens, "hit_rate": 0.6}


def test_bumping_prefix_starts_fresh_stats(client, monkeypatch):
    cache.get_or_set(MSGS, "m", counting(), client=client)
    cache.get_or_set(MSGS, "m", counting(), client=client)
    monkeypatch.setattr(cache, "PREFIX", cache.PREFIX + "v2:")
    assert cache.stats(client=client)["hits"] == 0


def test_stats_shards_live_for_stats_ttl_and_traffic_refreshes_them(client, monkeypatch):
    monkeypatch.setattr(cache, "STATS_TTL", 1000)
    monkeypatch.setattr(cache, "HOT_WINDOW", 100)
    shard = cache._keys(MSGS, "m", None)[3]
    cache.get_or_set(MSGS, "m", counting(), client=client)  # a miss
    assert 990 < client.ttl(shard) <= 1000
    client.expire(shard, 5)
    cache.stats(client=client)  # a flush with no hits to send leaves the shard alone
    assert client.ttl(shard) <= 5
    cache.get_or_set(MSGS, "m", counting(), client=client)  # a hit that opens a hot window
    cache.stats(client=client)
    assert 990 < client.ttl(shard) <= 1000
    client.expire(shard, 5)
    cache.get_or_set(MSGS, "m", counting(), client=client)  # a hit in that window: every flush refreshes it
    cache.stats(client=client)
    assert 990 < client.ttl(shard) <= 1000
    cache.get_or_set(MSGS, "other", counting(), client=client)  # a miss, in this shard or another
    assert 990 < client.ttl(cache._keys(MSGS, "other", None)[3]) <= 1000
    assert cache.stats(client=client)["misses"] == 2


def test_an_expired_shard_comes_back_with_a_ttl(client, monkeypatch):
    monkeypatch.setattr(cache, "STATS_TTL", 1000)
    monkeypatch.setattr(cache, "HOT_WINDOW", 100)
    entry, shard = cache._keys(MSGS, "m", None)[0], cache._keys(MSGS, "m", None)[3]
    cache.get_or_set(MSGS, "m", counting(), client=client)
    client.delete(shard)  # expired after a quiet STATS_TTL, which closed the entry's window too
    client.hdel(entry, "w", "n")
    cache.get_or_set(MSGS, "m", counting(), client=client)
    assert cache.stats(client=client)["hits"] == 1  # (which sends the hit)
    assert 990 < client.ttl(shard) <= 1000


def test_a_store_whose_reply_was_lost_and_retried_counts_one_miss(server):
    direct = server.client()
    cache.get_or_set(MSGS, "warm", counting(), client=direct)  # loads the scripts
    held = []

    def the_store_reply(data):  # the store's "nothing was stored before you" (nil); hold back the first
        if data in (b"$-1\r\n", b"_\r\n") and not held:
            held.append(data)
            return True
        return False

    proxy = DelayingProxy(server.port, delay=0.5, when=the_store_reply)
    timeouts_too = (redis.ConnectionError, redis.TimeoutError)  # as a Retry made without supported_errors
    r = redis.Redis(port=proxy.port, socket_timeout=0.2, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 1,
                                                                               supported_errors=timeouts_too))
    call_fn = counting()
    assert cache.get_or_set(MSGS, "m", call_fn, client=r) == ANSWER
    proxy.close()
    assert held and call_fn.calls == 1
    stats = cache.stats(client=direct)
    assert (stats["hits"], stats["misses"]) == (0, 2)  # "warm" and "m": the retried store was no second miss


ANSWER_NO_USAGE = {"choices": [{"message": {"role": "assistant", "content": "Paris is the capital of France."}}]}


def _counted(encoding, answer_text, messages=MSGS):
    return sum(len(encoding.encode(m["content"])) for m in messages) + len(encoding.encode(answer_text))


@pytest.mark.parametrize("model, default, expected", [
    ("gpt-4", "cl100k_base", BYTES), ("gpt-4o", "cl100k_base", PAIRS),  # models tiktoken knows: their own encoding
    ("some-local-llama", "cl100k_base", BYTES), ("some-local-llama", "o200k_base", PAIRS),  # others: the default
])
def test_tokens_without_usage_are_counted_once_at_write_time(ask, client, monkeypatch, model, default, expected):
    monkeypatch.setattr(cache, "DEFAULT_ENCODING", default)  # read at call time
    tokens = _counted(expected, ANSWER_NO_USAGE["choices"][0]["message"]["content"])
    assert _counted(BYTES, "Paris is the capital of France.") != _counted(PAIRS, "Paris is the capital of France.")
    ask(MSGS, model, counting(ANSWER_NO_USAGE), client=client)
    assert int(client.hget(cache._keys(MSGS, model, None)[0], "t")) == tokens  # counted once, when stored
    ask(MSGS, model, counting(ANSWER_NO_USAGE), client=client)
    ask(MSGS, model, counting(ANSWER_NO_USAGE), client=client)
    assert ask.stats(client=client)["tokens_saved"] == 2 * tokens


def test_a_plain_string_answer_is_counted_too(ask, client):
    ask(MSGS, "gpt-4", counting("Paris."), client=client)
    ask(MSGS, "gpt-4", counting("Paris."), client=client)
    assert ask.stats(client=client)["tokens_saved"] == _counted(BYTES, "Paris.")


def _ask_new(client, n, answer="Paris."):
    messages = [{"role": "user", "content": f"question {n}"}]
    assert cache.get_or_set(messages, "gpt-4", counting(answer), client=client) == answer
    return int(client.hget(cache._keys(messages, "gpt-4", None)[0], "t")), _counted(BYTES, answer, messages)


def test_a_stalled_encoding_download_never_holds_up_a_call(client, monkeypatch, caplog):
    release, loads = threading.Event(), []

    def stalled_download(name):  # tiktoken's download with no network answering, until released
        loads.append(name)
        release.wait(30)
        return BYTES

    monkeypatch.setattr(cache, "_encodings", {})
    monkeypatch.setattr(tiktoken, "get_encoding", stalled_download)
    try:
        with caplog.at_level(logging.WARNING, logger="cache"):
            counts = [_ask_new(client, n)[0] for n in range(3)]
        assert not release.is_set() and loads == ["cl100k_base"]  # answered while the one load still hangs
        assert counts == [0, 0, 0]
        assert [len(r.message) < 100 for r in caplog.records] == [True]  # one short warning
    finally:
        release.set()
    _until(lambda: "cl100k_base" in cache._encodings)
    counted, tokens = _ask_new(client, 3)
    assert counted == tokens  # exact once the encoding is at hand


def test_a_failed_encoding_load_counts_zero_and_is_tried_again_a_minute_later(client, monkeypatch, caplog):
    loads = []

    def offline(name):
        loads.append(name)
        if len(loads) == 1:
            raise OSError("no network")
        return BYTES

    monkeypatch.setattr(cache, "_encodings", {})
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with caplog.at_level(logging.INFO, logger="cache"):
        assert _ask_new(client, 0)[0] == 0
        _until(lambda: cache._loads.get("cl100k_base", math.inf) < math.inf)  # the load failed
        assert _ask_new(client, 1)[0] == 0  # not tried again yet
    assert loads == ["cl100k_base"]
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"] and "OSError" in caplog.records[1].message
    cache._loads["cl100k_base"] -= 61  # a minute later
    assert _ask_new(client, 2)[0] == 0  # this one starts the load
    _until(lambda: "cl100k_base" in cache._encodings)
    counted, tokens = _ask_new(client, 3)
    assert loads == ["cl100k_base"] * 2 and counted == tokens


def test_a_fork_during_an_encoding_load_leaves_the_child_a_working_tiktoken(monkeypatch):
    import tiktoken.registry

    holding, release = threading.Event(), threading.Event()

    def download(name):  # like tiktoken's own, it holds the registry's lock while it downloads
        with tiktoken.registry._lock:
            holding.set()
            release.wait(30)
        return BYTES

    monkeypatch.setattr(cache, "_encodings", {})
    monkeypatch.setattr(tiktoken, "get_encoding", download)
    monkeypatch.setattr(tiktoken.registry, "_lock", tiktoken.registry._lock)  # restored after the test
    cache._encoding("gpt-4")
    assert holding.wait(30)
    got = FORK.Value("i", -1)
    child = FORK.Process(target=lambda: setattr(got, "value", int(tiktoken.registry._lock.acquire(timeout=5))))
    child.start()
    child.join(30)
    release.set()
    _until(lambda: "cl100k_base" in cache._encodings)
    assert got.value == 1  # the child's tiktoken is not stuck behind the parent's thread


def test_a_child_forked_while_a_thread_claims_a_load_can_claim_one(monkeypatch):
    monkeypatch.setattr(cache, "_loading", threading.Lock())
    got = FORK.Value("i", -1)
    with cache._loading:  # as a thread of this process would hold it, deciding on a load
        child = FORK.Process(target=lambda: setattr(got, "value", int(cache._loading.acquire(timeout=5))))
        child.start()
        child.join(30)
    assert got.value == 1


def test_without_tiktoken_answers_count_zero_with_one_warning(client, monkeypatch, caplog):
    monkeypatch.setattr(cache, "_encodings", {})
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken raises ImportError
    with caplog.at_level(logging.WARNING, logger="cache"):
        assert [_ask_new(client, n)[0] for n in range(5)] == [0] * 5
    assert len(caplog.records) == 1


def test_the_real_cl100k_base_counts_tokens(client, monkeypatch):
    """The one test that loads a real encoding: from tiktoken's cache only, never downloading it."""
    blob = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR",  # as tiktoken looks
                               os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    if not cache_dir or not os.path.exists(os.path.join(cache_dir, hashlib.sha1(blob.encode()).hexdigest())):
        reason = "cl100k_base is not in tiktoken's cache (set TIKTOKEN_CACHE_DIR to a directory holding it)"
        pytest.fail(f"CI is set but {reason}") if os.environ.get("CI") else pytest.skip(reason)
    monkeypatch.setattr(cache, "_encodings", {})
    assert _ask_new(client, 0, "Hello world")[0] == 0  # the first answer counts 0 while the encoding loads
    _until(lambda: "cl100k_base" in cache._encodings)
    real = cache._encodings["cl100k_base"]
    assert real.encode("hello world") == [15339, 1917]  # cl100k_base's own ids, not a stand-in's
    counted, _ = _ask_new(client, 1, "Hello world")
    assert counted == len(real.encode("question 1")) + len(real.encode("Hello world")) == 5


# ---------------------------------------------------------------- streams

def chunk(text=None, usage=None, finish=None):
    """A chat.completion.chunk: a delta of text (the last one with its finish_reason), or the one with usage."""
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [] if text is None else [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
            **({"usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": usage}} if usage else {})}


CHUNKS = [chunk("Par"), chunk("is.", finish="stop"), chunk(usage=7)]
EVENTS = [  # an Anthropic message stream
    {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                          "content": [], "stop_reason": None, "usage": {"input_tokens": 5}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Paris."}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}},
    {"type": "message_stop"},
]


class Model:
    """A call_fn whose answer streams chunks. It counts its calls and the chunks it gave; the calls numbered in
    breaks raise instead of giving chunk break_at; gates[i], if given, holds chunk i back until it is set."""

    def __init__(self, chunks=CHUNKS, breaks=(), gates=None, break_at=1):
        self.chunks, self.breaks, self.gates, self.break_at = chunks, breaks, gates, break_at
        self.calls = self.given = self.closed = 0

    def __call__(self):
        self.calls += 1
        return self.stream(self.calls)

    def stream(self, call):
        try:
            for i, c in enumerate(self.chunks):
                if self.gates:
                    assert self.gates[i].wait(30)
                if call in self.breaks and i == self.break_at:
                    raise ConnectionResetError("the model's stream broke")
                self.given += 1
                yield c
        except GeneratorExit:
            self.closed += 1
            raise


def test_a_stream_is_relayed_as_it_comes_then_stored_and_replayed(ask, client):
    model = Model()
    stream = ask(MSGS, "m", model, client=client, params={"stream": True})
    assert model.given == 0  # nothing is read before the caller asks
    assert ask.next(stream) == CHUNKS[0] and model.given == 1  # each chunk as the model gives it
    first = [CHUNKS[0], *ask.read(stream)]
    replayed = ask.read(ask(MSGS, "m", model, client=client, params={"stream": True}))
    assert first == replayed == CHUNKS and model.calls == 1
    assert ask.stats(client=client) == {"hits": 1, "misses": 1, "tokens_saved": 7, "hit_rate": 0.5}


@pytest.mark.parametrize("chunks", [[chunk("Par"), chunk("is.", finish="stop")], ["Par", "is."]],
                         ids=["deltas", "strings"])
def test_a_stream_without_usage_counts_its_prompt_and_text(ask, client, chunks):
    model = Model(chunks)
    for _ in range(2):
        assert ask.read(ask(MSGS, "m", model, client=client)) == model.chunks
    assert ask.stats(client=client)["tokens_saved"] == sum(len(m["content"]) for m in MSGS) + len("Paris.")


def test_an_empty_stream_is_stored_and_replayed_empty(ask, client):
    model = Model([])
    assert ask.read(ask(MSGS, "m", model, client=client)) == ask.read(ask(MSGS, "m", model, client=client)) == []
    assert model.calls == 1


@pytest.mark.parametrize("chunks, complete", [
    (CHUNKS, True), ([chunk("Par"), chunk("is."), chunk(usage=7)], False), (EVENTS, True), (EVENTS[:-1], False),
    (["Par", "is."], True),
    ([chunk("Par"), {"type": "error", "error": {"type": "overloaded_error"}}, *CHUNKS[1:]], False),
    ([*CHUNKS[:2], {**chunk("The capi"), "choices": [{"index": 1, "delta": {"content": "The capi"}}]}], False),
], ids=["openai", "openai-without-finish-reason", "anthropic", "anthropic-without-message-stop", "other",
        "an-error-event", "openai-n2-one-choice-unfinished"])
def test_a_stream_is_stored_only_if_it_ended_complete(ask, client, chunks, complete):
    model = Model(chunks)
    for _ in range(2):
        assert ask.read(ask(MSGS, "m", model, client=client)) == chunks  # relayed whole, complete or not
    stats = ask.stats(client=client)
    assert model.calls == (1 if complete else 2)
    assert (stats["hits"], stats["misses"]) == ((1, 1) if complete else (0, 0))


def test_a_stream_that_breaks_stores_nothing_and_releases_the_lock_at_once(ask, client):
    model = Model(breaks={1})
    stream = ask(MSGS, "m", model, client=client)
    assert ask.next(stream) == CHUNKS[0]
    with pytest.raises(ConnectionResetError):
        ask.next(stream)
    entry, lock = cache._keys(MSGS, "m", None)[:2]
    assert client.exists(entry, lock) == 0
    assert ask.read(ask(MSGS, "m", model, client=client)) == CHUNKS and model.calls == 2


@pytest.mark.parametrize("how", ["close", "drop unread", "drop after a chunk"])
def test_a_stream_its_caller_stops_stores_nothing_and_releases_the_lock(ask, client, how):
    # scripts loaded first: fakeredis keeps the NoScriptError of a first EVALSHA, whose traceback holds the frames
    # that returned the stream, so that dropping it would not drop the last reference to it
    ask(MSGS, "warm", counting(), client=client)
    model = Model()
    stream = ask(MSGS, "m", model, client=client)
    entry, lock = cache._keys(MSGS, "m", None)[:2]
    assert client.exists(lock) == 1
    if how != "drop unread":
        ask.next(stream)
    if how == "close":
        ask.close(stream)
    else:
        del stream  # asyncio closes a dropped async generator in a task of its loop
        gc.collect()  # (the test's event loop thread keeps a cycle through the last result)
    _until(lambda: client.exists(lock) == 0 and model.closed == (how != "drop unread"))  # and the model's stream
    assert client.exists(entry) == 0


@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_stream_its_caller_stops_at_the_finish_reason_is_stored_as_it_came(ask, client, how):
    ask(MSGS, "warm", counting(), client=client)  # (scripts loaded first: see the test above)
    model = Model()
    stream = ask(MSGS, "m", model, client=client)
    assert [ask.next(stream), ask.next(stream)] == CHUNKS[:2]  # the last with its finish_reason: the answer is whole
    if how == "close":
        ask.close(stream)
    else:
        del stream  # asyncio closes a dropped async generator in a task of its loop
        gc.collect()  # (the test's event loop thread keeps a cycle through the last result)
    _until(lambda: client.exists(cache._keys(MSGS, "m", None)[1]) == 0)
    assert ask.read(ask(MSGS, "m", model, client=client)) == CHUNKS[:2]  # (closing never waits for what follows)
    assert model.calls == 1 and model.closed == 1


def test_a_stream_closed_when_one_of_its_choices_is_finished_stores_nothing(ask, client):
    unfinished = {**chunk("The capi"), "choices": [{"index": 1, "delta": {"content": "The capi"},
                                                     "finish_reason": None}]}
    model = Model([CHUNKS[1], unfinished, CHUNKS[1]])  # n=2: choice 0 is finished, choice 1 is not yet
    stream = ask(MSGS, "m", model, client=client)
    assert [ask.next(stream), ask.next(stream)] == [CHUNKS[1], unfinished]
    ask.close(stream)
    _until(lambda: client.exists(cache._keys(MSGS, "m", None)[1]) == 0)  # (let go by the background worker)
    assert ask.read(ask(MSGS, "m", model, client=client)) == model.chunks and model.calls == 2


def test_a_follower_gets_the_whole_stream_when_its_leader_stops_at_the_finish_reason(client):
    gates = [threading.Event() for _ in CHUNKS]
    model = Model(gates=gates)
    leader = cache.get_or_set(MSGS, "m", model, client=client)
    gates[0].set()
    assert next(leader) == CHUNKS[0]
    follower = elsewhere(lambda: cache.get_or_set(MSGS, "m", model, client=client))
    assert next(follower) == CHUNKS[0]
    for gate in gates[1:]:
        gate.set()
    assert next(leader) == CHUNKS[1]
    leader.close()
    assert list(follower) == [CHUNKS[1]] and model.calls == 1


def test_a_task_cancelled_after_its_streams_final_event_stores_it(ask_async_client, client):
    loop, aclient = ask_async_client
    calls = []

    async def model():
        calls.append(1)
        for event in EVENTS:
            yield event
        model.ended.set()
        await asyncio.sleep(30)  # the end of the connection, still to come

    async def read():
        return [event async for event in await cache.aget_or_set(MSGS, "m", model, client=aclient)]

    async def cancelled_at_the_end():
        model.ended = asyncio.Event()
        reading = asyncio.ensure_future(read())
        await model.ended.wait()
        reading.cancel()  # a request's timeout, say
        with contextlib.suppress(asyncio.CancelledError):
            await reading

    loop.run(cancelled_at_the_end())
    _until(lambda: client.exists(cache._keys(MSGS, "m", None)[1]) == 0)
    assert loop.run(read()) == EVENTS and len(calls) == 1


def test_a_stream_still_open_when_asyncio_run_ends_lets_its_lock_go(real_url):
    kept = []

    async def model():
        yield CHUNKS[0]
        await asyncio.sleep(0.2)
        yield CHUNKS[1]

    async def main():
        r = redis.asyncio.Redis.from_url(real_url)
        stream = await cache.aget_or_set(MSGS, "m", model, client=r)
        kept.append(stream)  # it outlives the loop: asyncio.run's end closes it, after the worker task has ended
        assert await stream.__anext__() == CHUNKS[0]

    asyncio.run(main())
    assert redis.Redis.from_url(real_url).exists(*cache._keys(MSGS, "m", None)[:2]) == 0


@pytest.mark.parametrize("before", [CHUNKS[:1], CHUNKS[:2]], ids=["mid-answer", "after-the-finish-reason"])
def test_a_chunk_that_is_not_json_raises_type_error_and_stores_nothing(ask, client, before):
    model = Model([*before, {"delta": object()}])
    stream = ask(MSGS, "m", model, client=client)
    assert [ask.next(stream) for _ in before] == before
    with pytest.raises(TypeError, match="call_fn's stream gave a dict, not JSON"):
        ask.next(stream)
    _until(lambda: client.exists(cache._keys(MSGS, "m", None)[1]) == 0)
    assert client.exists(cache._keys(MSGS, "m", None)[0]) == 0


def test_an_async_iterator_given_to_get_or_set_is_a_type_error_and_stores_nothing(client):
    async def chunks():
        yield CHUNKS[0]

    with pytest.raises(TypeError, match="call_fn returned a async_generator, not JSON"):
        cache.get_or_set(MSGS, "m", chunks, client=client)
    assert client.exists(*cache._keys(MSGS, "m", None)[:2]) == 0


def test_aget_or_set_relays_an_async_iterator(ask_async_client, client):
    loop, aclient = ask_async_client
    calls = []

    async def chunks():
        calls.append(1)
        for c in CHUNKS:
            yield c

    async def read():
        return [c async for c in await cache.aget_or_set(MSGS, "m", chunks, client=aclient)]

    assert loop.run(read()) == loop.run(read()) == CHUNKS and len(calls) == 1


def test_with_redis_down_chunks_pass_straight_through_converted(ask, caplog):
    dead = redis.Redis(port=_free_port(), retry=None)  # refused at once, not retried
    model = Model([ChatCompletionChunk.model_validate(c) for c in CHUNKS])
    with caplog.at_level(logging.WARNING, logger="cache"):
        for _ in range(2):
            chunks = ask.read(ask(MSGS, "m", model, client=dead))
            assert [ChatCompletionChunk.model_validate(c) for c in chunks] == model.chunks
            assert all(isinstance(c, dict) for c in chunks)
    assert model.calls == 2


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_redis_that_fails_mid_stream_costs_the_leader_no_chunk(server, fault, caplog):
    r = server.client(socket_timeout=0.2, socket_connect_timeout=0.2, retry=None)
    leader = cache.get_or_set(MSGS, "m", Model(), client=r)
    assert next(leader) == CHUNKS[0]
    server.kill() if fault == "killed" else server.freeze()
    with caplog.at_level(logging.WARNING, logger="cache"):
        assert list(leader) == CHUNKS[1:]
        cache._run_chores(cache._SYNC)  # the publishes and the store the worker was handed, done by now
    assert any("Redis failed" in record.message for record in caplog.records)


def test_published_chunks_live_as_long_as_the_lock_and_are_trimmed_at_the_end(client, monkeypatch):
    monkeypatch.setattr(cache, "LOCK_TTL", 5)
    stream = cache.get_or_set(MSGS, "m", Model(), client=client)
    stream_key = cache._keys(MSGS, "m", None)[2]
    next(stream), next(stream)
    _until(lambda: client.xlen(stream_key) == 2)  # published beside the caller
    assert 0 < client.pttl(stream_key) <= 5000
    list(stream)
    cache.stats(client=client)  # (the store, which trims them, is the worker's)
    assert client.xlen(stream_key) == 1 and 0 < client.pttl(stream_key) <= 5000  # only the wake-up is left


def test_a_corrupt_stream_entry_is_a_miss_and_is_overwritten(ask, client):
    entry = cache._keys(MSGS, "m", None)[0]
    client.hset(entry, mapping={"v": "\x1e{not a list", "t": 3})
    model = Model()
    assert ask.read(ask(MSGS, "m", model, client=client)) == CHUNKS and model.calls == 1
    assert ask.read(ask(MSGS, "m", model, client=client)) == CHUNKS and model.calls == 1


def test_followers_get_the_chunks_live_from_the_first(client):
    gates = [threading.Event() for _ in CHUNKS]
    model = Model(gates=gates)
    leader = cache.get_or_set(MSGS, "m", model, client=client)
    gates[0].set()
    assert next(leader) == CHUNKS[0]
    firsts = queue.Queue()

    def follow():
        stream = cache.get_or_set(MSGS, "m", model, client=client)
        first = next(stream)
        firsts.put(first)
        return [first, *stream]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        followers = [pool.submit(follow) for _ in range(4)]
        assert [firsts.get(timeout=30) for _ in followers] == [CHUNKS[0]] * 4  # while the model holds chunk 1
        for gate in gates[1:]:
            gate.set()
        assert list(leader) == CHUNKS[1:]
        assert [f.result(timeout=30) for f in followers] == [CHUNKS] * 4
    assert model.calls == 1
    assert cache.stats(client=client) == {"hits": 4, "misses": 1, "tokens_saved": 28, "hit_rate": 0.8}


def _waiting_in_xread(r, n):
    return sum(c["cmd"] == "xread" for c in r.client_list()) == n


def test_a_follower_with_no_chunk_yet_calls_the_model_when_the_stream_breaks(server):
    r = server.client()
    model = Model(breaks={1}, break_at=0)
    leader = cache.get_or_set(MSGS, "m", model, client=r)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        follower = pool.submit(lambda: list(cache.get_or_set(MSGS, "m", model, client=server.client())))
        try:
            _until(lambda: _waiting_in_xread(r, 1))
            with pytest.raises(ConnectionResetError):
                next(leader)
        finally:
            leader.close()  # (if the test failed: else the follower would wait for it)
        assert follower.result(timeout=30) == CHUNKS
    assert model.calls == 2
    assert cache.stats(client=r) == {"hits": 0, "misses": 1, "tokens_saved": 0, "hit_rate": 0.0}


def test_a_follower_that_handed_out_chunks_raises_stream_interrupted_when_the_stream_breaks(ask, client):
    model = Model(breaks={1})
    leader = ask(MSGS, "m", model, client=client)
    assert ask.next(leader) == CHUNKS[0]
    follower = elsewhere(lambda: ask(MSGS, "m", model, client=client))
    assert ask.next(follower) == CHUNKS[0]
    with pytest.raises(ConnectionResetError):
        ask.next(leader)
    with pytest.raises(cache.StreamInterrupted):
        ask.next(follower)
    assert client.exists(*cache._keys(MSGS, "m", None)[:2]) == 0 and model.calls == 1


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_follower_reads_chunks_live_over_either_protocol(server, protocol):
    leader_client, follower_client = (server.client(protocol=protocol, decode_responses=d) for d in (False, True))
    gates = [threading.Event() for _ in CHUNKS]
    gates[0].set()
    leader = cache.get_or_set(MSGS, "m", Model(gates=gates), client=leader_client)
    assert next(leader) == CHUNKS[0]
    follower = elsewhere(lambda: cache.get_or_set(MSGS, "m", Model(), client=follower_client))
    assert next(follower) == CHUNKS[0]
    for gate in gates[1:]:
        gate.set()
    assert list(leader) == CHUNKS[1:] and list(follower) == CHUNKS[1:]


def test_a_follower_never_hands_out_the_rest_of_another_answer(ask, client):
    leader = ask(MSGS, "m", Model(), client=client)
    assert ask.next(leader) == CHUNKS[0]
    follower = elsewhere(lambda: ask(MSGS, "m", Model(), client=client))
    assert ask.next(follower) == CHUNKS[0]
    ask.close(leader)  # it stops, and another caller answers the whole request before the follower reads on
    ask.stats(client=client)  # (the release is the worker's)
    other = [chunk("Lyon.", finish="stop"), chunk(usage=5)]
    assert ask.read(ask(MSGS, "m", Model(other), client=client)) == other
    with pytest.raises(cache.StreamInterrupted):
        ask.next(follower)


def test_a_chunk_published_twice_is_handed_out_once(client):
    leader = cache.get_or_set(MSGS, "m", Model(), client=client)
    assert next(leader) == CHUNKS[0]
    follower = elsewhere(lambda: cache.get_or_set(MSGS, "m", Model(), client=client))
    assert next(follower) == CHUNKS[0]
    keys = cache._keys(MSGS, "m", None)
    # as a publish whose reply was lost, and which the client then retried, leaves it
    run_script(client, cache._PUBLISH, keys[1:3], client.get(keys[1]), 10_000, 0, json.dumps(CHUNKS[0]))
    assert next(leader) == CHUNKS[1]
    assert next(follower) == CHUNKS[1]
    assert list(leader) == list(follower) == CHUNKS[2:]


def test_a_stream_left_unread_lets_its_lock_go_and_another_caller_leads(ask, client, monkeypatch):
    monkeypatch.setattr(cache, "LOCK_TTL", 0.3)
    monkeypatch.setattr(cache, "MAX_WAIT", 0.5)  # its waiters have given up by then
    model = Model()
    held = ask(MSGS, "m", model, client=client)  # never read or closed (kept by a traceback, say)
    _until(lambda: client.exists(cache._keys(MSGS, "m", None)[1]) == 0, timeout=5)
    assert ask.read(ask(MSGS, "m", model, client=client)) == CHUNKS and model.calls == 2
    assert ask.read(held) == CHUNKS  # read at last, it still gives its own answer


def test_a_reader_slower_than_the_lock_keeps_it_and_its_followers(client, monkeypatch):
    monkeypatch.setattr(cache, "LOCK_TTL", 0.3)
    gates = [threading.Event() for _ in CHUNKS]
    model = Model(gates=gates)
    leader = cache.get_or_set(MSGS, "m", model, client=client)
    gates[0].set()
    assert next(leader) == CHUNKS[0]
    follower = elsewhere(lambda: cache.get_or_set(MSGS, "m", model, client=client))
    assert next(follower) == CHUNKS[0]
    time.sleep(1.0)  # the leader's caller holds its chunk for three LOCK_TTLs; then another caller comes
    late = elsewhere(lambda: cache.get_or_set(MSGS, "m", model, client=client))
    for gate in gates[1:]:
        gate.set()
    assert list(leader) == list(follower) == CHUNKS[1:] and list(late) == CHUNKS and model.calls == 1


def _lead_and_break(url, model):
    async def main():
        r = redis.asyncio.Redis.from_url(url)
        async for _ in await cache.aget_or_set(MSGS, "m", model, client=r):
            break  # and return, the stream unfinished: asyncio.run cancels the tasks, then closes the generators

    asyncio.run(main())


def test_asyncio_run_returns_with_a_stream_left_unfinished_and_releases_its_lock(real_url):
    model = Model(gates=[threading.Event() for _ in CHUNKS])
    model.gates[0].set()
    runner = threading.Thread(target=_lead_and_break, args=(real_url, model), daemon=True)
    runner.start()
    runner.join(timeout=10)
    assert not runner.is_alive()
    assert redis.Redis.from_url(real_url).exists(*cache._keys(MSGS, "m", None)[:2]) == 0 and model.closed == 1


def test_a_thread_asking_again_while_it_leads_a_stream_does_not_wait_for_itself(client, monkeypatch):
    monkeypatch.setattr(cache, "MAX_WAIT", 2)
    model = Model()
    first = cache.get_or_set(MSGS, "m", model, client=client)
    assert next(first) == CHUNKS[0]  # then it breaks out of its loop, keeping the iterator, and asks again
    assert list(cache.get_or_set(MSGS, "m", model, client=client)) == CHUNKS and model.calls == 2
    assert list(first) == CHUNKS[1:]


def test_a_follower_that_comes_to_lead_and_asks_again_through_another_client_does_not_wait_for_itself(
        client, monkeypatch):
    monkeypatch.setattr(cache, "MAX_WAIT", 2)
    model = Model()
    first = cache.get_or_set(MSGS, "m", model, client=client)  # leads, and will stop before any chunk

    def follow_then_lead_then_ask_again():
        stream = cache.get_or_set(MSGS, "m", model, client=twin(client))  # waits, then leads once first stops
        head = next(stream)
        again = list(cache.get_or_set(MSGS, "m", model, client=twin(client)))
        return [head, *stream], again

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(follow_then_lead_then_ask_again)
        _until(lambda: cache._wait_slots)  # it waits
        first.close()
        assert outcome.result(timeout=30) == (CHUNKS, CHUNKS)
    assert model.calls == 3  # the first caller's, the follower's when it came to lead, and its second ask's


def test_a_thread_asking_again_twice_while_it_leads_a_stream_never_waits_for_itself(client, monkeypatch):
    monkeypatch.setattr(cache, "MAX_WAIT", 20)
    model = Model()

    def ask_three_times():
        first = cache.get_or_set(MSGS, "m", model, client=client)
        next(first)
        second = cache.get_or_set(MSGS, "m", model, client=client)  # led by it too
        head = next(second)
        second.close()  # and stopped
        return head, list(cache.get_or_set(MSGS, "m", model, client=client)), list(first)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert pool.submit(ask_three_times).result(timeout=10) == (CHUNKS[0], CHUNKS, CHUNKS[1:])


def test_a_thread_given_the_ident_of_an_ended_thread_that_leads_a_stream_follows_it(client):
    model, firsts, followed = Model(), queue.Queue(), []
    ident, leader = elsewhere(lambda: (threading.get_ident(), cache.get_or_set(MSGS, "m", model, client=client)))

    def follow():
        stream = cache.get_or_set(MSGS, "m", model, client=client)
        first = next(stream)
        firsts.put(first)
        followed.extend([first, *stream])

    follower = thread_with_ident(ident, follow)  # the leading thread has ended; its stream is read here
    try:
        assert next(leader) == CHUNKS[0]
        try:
            firsts.get(timeout=2)  # live, while the leader's caller holds the rest
        except queue.Empty:  # (or it waits for the whole answer)
            pass
    finally:
        rest = list(leader)
        follower.join(timeout=30)
    assert rest == CHUNKS[1:] and followed == CHUNKS and model.calls == 1


def test_a_task_asking_again_while_it_leads_a_stream_does_not_wait_for_itself(ask_async_client, monkeypatch):
    (loop, aclient), model = ask_async_client, Model()
    monkeypatch.setattr(cache, "MAX_WAIT", 2)

    async def twice():
        first = await cache.aget_or_set(MSGS, "m", model, client=aclient)
        assert await first.__anext__() == CHUNKS[0]
        assert [c async for c in await cache.aget_or_set(MSGS, "m", model, client=aclient)] == CHUNKS
        return [c async for c in first]

    assert loop.run(twice()) == CHUNKS[1:] and model.calls == 2


def test_a_sync_stream_made_in_a_running_event_loop_outlives_it(client):
    model = Model()

    async def make():
        return cache.get_or_set(MSGS, "m", model, client=client)

    stream = asyncio.run(make())  # which closes the async generators it knows of
    assert list(stream) == CHUNKS
    assert list(cache.get_or_set(MSGS, "m", model, client=client)) == CHUNKS and model.calls == 1


def test_a_stream_key_of_another_type_is_replaced_when_a_leader_takes_the_lock(client):
    client.set(cache._keys(MSGS, "m", None)[2], "not a stream")
    model = Model()
    leader = cache.get_or_set(MSGS, "m", model, client=client)
    assert next(leader) == CHUNKS[0]
    follower = elsewhere(lambda: cache.get_or_set(MSGS, "m", model, client=client))
    assert next(follower) == CHUNKS[0]  # live
    assert list(leader) == list(follower) == CHUNKS[1:] and model.calls == 1


def test_a_follower_whose_stream_key_turns_into_another_type_reads_the_entry(server, caplog):
    client, model = server.client(), Model()  # (fakeredis raises its own AttributeError there)
    leader = cache.get_or_set(MSGS, "m", model, client=client)
    assert next(leader) == CHUNKS[0]
    follower = elsewhere(lambda: cache.get_or_set(MSGS, "m", model, client=client))
    assert next(follower) == CHUNKS[0]
    stream_key = cache._keys(MSGS, "m", None)[2]
    client.delete(stream_key)
    client.set(stream_key, "not a stream")  # its reads now get error replies
    with caplog.at_level(logging.WARNING, logger="cache"):
        assert list(leader) == CHUNKS[1:]
        assert list(follower) == CHUNKS[1:] and model.calls == 1


def _follow_stream(url, firsts, results):
    r = redis.Redis.from_url(url)
    stream = cache.get_or_set(MSGS, "m", lambda: r.incr(cache.PREFIX + "calls") and iter(CHUNKS), client=r)
    first = next(stream)
    firsts.put(first)
    results.put([first, *stream])


def test_followers_in_4_processes_get_the_chunks_live(real_url):
    r = redis.Redis.from_url(real_url)
    gates = [threading.Event() for _ in CHUNKS]
    gates[0].set()
    leader = cache.get_or_set(MSGS, "m", Model(gates=gates), client=r)
    assert next(leader) == CHUNKS[0]
    firsts, results = FORK.Queue(), FORK.Queue()
    procs = [FORK.Process(target=_follow_stream, args=(real_url, firsts, results)) for _ in range(4)]
    for p in procs:
        p.start()
    assert [firsts.get(timeout=30) for _ in procs] == [CHUNKS[0]] * 4  # while the model holds chunk 1 back
    for gate in gates[1:]:
        gate.set()
    assert list(leader) == CHUNKS[1:]
    assert [results.get(timeout=30) for _ in procs] == [CHUNKS] * 4
    for p in procs:
        p.join(timeout=10)
    assert r.get(cache.PREFIX + "calls") is None
    assert cache.stats(client=r)["hits"] == 4


def _lead_a_stream(url, holding, go, results):
    r = redis.Redis.from_url(url, socket_timeout=0.5)

    def model():
        holding.set()
        yield CHUNKS[0]
        go.wait(30)
        yield from CHUNKS[1:]

    results.put(list(cache.get_or_set(MSGS, "m", model, client=r)))


def test_a_follower_gets_every_chunk_through_a_stall_that_timed_out_another_call_of_its_process(server):
    holding, go, results = FORK.Event(), FORK.Event(), FORK.Queue()
    leader = FORK.Process(target=_lead_a_stream, args=(server.url, holding, go, results))
    leader.start()
    retry = redis.retry.Retry(redis.backoff.NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    r, model, other, firsts = server.client(socket_timeout=0.5, retry=retry), Model(), counting(), queue.Queue()
    question = [{"role": "user", "content": "another question"}]
    cache.get_or_set(question, "m", other, client=r)
    cache.stats(client=r)  # (which finishes the store)

    def follow():
        stream = cache.get_or_set(MSGS, "m", model, client=r)
        first = next(stream)
        firsts.put(first)
        return [first, *stream]

    try:
        assert holding.wait(30)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            following = pool.submit(follow)
            assert firsts.get(timeout=30) == CHUNKS[0]
            server.freeze()
            try:  # another thread's hit, through the same client, times out: the model answers it
                assert cache.get_or_set(question, "m", other, client=r) == ANSWER and other.calls == 2
            finally:
                server.thaw()
            go.set()
            assert following.result(timeout=30) == CHUNKS
        assert results.get(timeout=30) == CHUNKS and model.calls == 0
    finally:
        go.set()
        leader.join(timeout=10)
        leader.kill()


# ---------------------------------------------------------------- the openai SDK, for real

class FakeOpenAI(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that records requests; self.server.mode picks the answer."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.server.mode in (500, 429):
            self._send(self.server.mode, {"error": {"message": "try later", "type": "server_error"}},
                       {"retry-after-ms": "10"})
        elif body.get("stream"):  # server-sent events, in a chunked body; mode "cut" drops the connection in it
            self.protocol_version, self.close_connection = "HTTP/1.1", True
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for n, (word, finish) in enumerate((("Par", None), ("is.", "stop"), (None, None))):
                if n == 1 and self.server.mode == "cut":
                    return
                event = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": finish}] if word else [],
                         "usage": None if word else {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22}}
                data = f"data: {json.dumps(event)}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        else:
            n = len(self.server.requests)
            self._send(200, {
                "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1_700_000_000 + n,
                "model": body["model"], "system_fingerprint": "fp_test",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": f"Paris. (answer {n})", "refusal": None}}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}})

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def openai_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    httpd.requests, httpd.mode = [], "ok"
    httpd.handle_error = lambda request, address: None  # a client that drops a stream is no server error
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, openai.OpenAI(base_url=f"http://127.0.0.1:{httpd.server_port}/v1", api_key="test")
    httpd.shutdown()


@pytest.mark.parametrize("dump", [True, False], ids=["model_dump", "ChatCompletion"])
def test_openai_sdk_two_identical_calls_reach_the_server_once(client, openai_server, dump):
    httpd, sdk = openai_server

    def call():
        completion = sdk.chat.completions.create(model="gpt-4.1-mini", messages=MSGS)
        return completion.model_dump() if dump else completion

    first = cache.get_or_set(MSGS, "gpt-4.1-mini", call, client=client)
    second = cache.get_or_set(MSGS, "gpt-4.1-mini", call, client=client)
    assert len(httpd.requests) == 1
    assert ChatCompletion.model_validate(first) == ChatCompletion.model_validate(second)
    assert first == second
    assert ChatCompletion.model_validate(second).choices[0].message.content == "Paris. (answer 1)"
    assert cache.stats(client=client)["tokens_saved"] == 25


def test_openai_sdk_different_params_are_different_entries(client, openai_server):
    httpd, sdk = openai_server
    variants = [{}, {"temperature": 0.9}, {"response_format": {"type": "json_object"}},
                {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}]
    for _ in range(2):
        for params in variants:
            cache.get_or_set(MSGS, "gpt-4.1-mini", lambda p=params: sdk.chat.completions.create(
                model="gpt-4.1-mini", messages=MSGS, **p), client=client, params=params)
    assert len(httpd.requests) == len(variants)
    assert [{k: v for k, v in r.items() if k not in ("model", "messages")} for r in httpd.requests] == variants


@pytest.mark.parametrize("status, error", [(500, openai.InternalServerError), (429, openai.RateLimitError)])
def test_openai_sdk_errors_reach_the_caller_and_nothing_is_cached(client, openai_server, status, error):
    httpd, sdk = openai_server
    httpd.mode = status
    call = lambda: sdk.chat.completions.create(model="gpt-4.1-mini", messages=MSGS)  # noqa: E731
    with pytest.raises(error):
        cache.get_or_set(MSGS, "gpt-4.1-mini", call, client=client)
    assert len(httpd.requests) == 1 + sdk.max_retries  # the SDK retried on its own first
    httpd.mode = "ok"
    answer = cache.get_or_set(MSGS, "gpt-4.1-mini", call, client=client)
    assert len(httpd.requests) == 2 + sdk.max_retries  # nothing was cached: the next call went to the server
    assert ChatCompletion.model_validate(answer).usage.total_tokens == 25


def _sdk_stream(sdk, client, **params):
    """get_or_set around the openai SDK's streamed chat completion, keyed on its params."""
    return cache.get_or_set(MSGS, "gpt-4.1-mini", lambda: sdk.chat.completions.create(
        model="gpt-4.1-mini", messages=MSGS, **params), client=client, params=params)


def test_openai_sdk_streams_reach_the_server_once_and_give_identical_chunks(client, openai_server):
    httpd, sdk = openai_server
    first, second = list(_sdk_stream(sdk, client, stream=True)), list(_sdk_stream(sdk, client, stream=True))
    assert len(httpd.requests) == 1 and first == second
    chunks = [ChatCompletionChunk.model_validate(c) for c in second]
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == "Paris."
    assert cache.stats(client=client)["tokens_saved"] == 22  # the last chunk's usage
    assert _sdk_stream(sdk, client)
    assert len(httpd.requests) == 2  # not streamed: another entry


def test_openai_sdk_stream_the_server_cuts_stores_nothing(client, openai_server):
    httpd, sdk = openai_server
    httpd.mode = "cut"
    with pytest.raises(Exception) as direct:  # what the SDK raises for a cut stream (an httpx error), uncached
        list(sdk.chat.completions.create(model="gpt-4.1-mini", messages=MSGS, stream=True))
    stream = _sdk_stream(sdk, client, stream=True)
    with pytest.raises(type(direct.value)):  # the same reaches the cache's caller
        list(stream)
    keys = cache._keys(MSGS, "gpt-4.1-mini", {"stream": True})
    assert client.exists(keys[0], keys[1]) == 0
    httpd.mode = "ok"
    assert len(list(_sdk_stream(sdk, client, stream=True))) == 3
    assert len(httpd.requests) == 3


def test_openai_sdk_stream_dropped_after_a_chunk_releases_the_lock_and_the_response(client, openai_server):
    httpd, sdk = openai_server
    cache.get_or_set(MSGS, "warm", counting(), client=client)  # (see test_a_stream_its_caller_stops_...)
    stream = _sdk_stream(sdk, client, stream=True)
    assert ChatCompletionChunk.model_validate(next(stream)).choices[0].delta.content == "Par"
    response = stream.gi_frame.f_locals["source"].response  # the SDK's HTTP response
    del stream
    assert response.is_closed
    cache.stats(client=client)  # (the release is the worker's)
    keys = cache._keys(MSGS, "gpt-4.1-mini", {"stream": True})
    assert client.exists(keys[0], keys[1]) == 0


def test_async_openai_streams_reach_the_server_once_and_a_cut_stores_nothing(ask_async_client, openai_server):
    (loop, aclient), (httpd, sdk) = ask_async_client, openai_server
    sdk = openai.AsyncOpenAI(base_url=str(sdk.base_url), api_key="test")

    async def read():
        stream = await cache.aget_or_set(MSGS, "gpt-4.1-mini", lambda: sdk.chat.completions.create(
            model="gpt-4.1-mini", messages=MSGS, stream=True), client=aclient, params={"stream": True})
        return [c async for c in stream]

    async def direct():
        return [c async for c in await sdk.chat.completions.create(model="gpt-4.1-mini", messages=MSGS, stream=True)]

    httpd.mode = "cut"
    with pytest.raises(Exception) as uncached:  # what the SDK raises for a cut stream (an httpx error)
        loop.run(direct())
    with pytest.raises(type(uncached.value)):  # the same reaches the cache's caller
        loop.run(read())
    httpd.mode = "ok"
    first, second = loop.run(read()), loop.run(read())
    assert len(httpd.requests) == 3 and first == second
    assert "".join(c.choices[0].delta.content for c in map(ChatCompletionChunk.model_validate, first)
                   if c.choices) == "Paris."
    loop.run(sdk.close())


def test_async_openai_two_identical_calls_reach_the_server_once(ask_async_client, openai_server):
    (loop, aclient), (httpd, sdk) = ask_async_client, openai_server
    sdk = openai.AsyncOpenAI(base_url=str(sdk.base_url), api_key="test")
    call = lambda: sdk.chat.completions.create(model="gpt-4.1-mini", messages=MSGS)  # noqa: E731
    first = loop.run(cache.aget_or_set(MSGS, "gpt-4.1-mini", call, client=aclient))
    second = loop.run(cache.aget_or_set(MSGS, "gpt-4.1-mini", call, client=aclient))
    assert len(httpd.requests) == 1
    assert first == second and ChatCompletion.model_validate(second).choices[0].message.content == "Paris. (answer 1)"
    assert loop.run(cache.astats(client=aclient))["tokens_saved"] == 25
    loop.run(sdk.close())


@pytest.mark.parametrize("status, error", [(500, openai.InternalServerError), (429, openai.RateLimitError)])
def test_async_openai_errors_reach_the_caller_and_nothing_is_cached(ask_async_client, openai_server, status, error):
    (loop, aclient), (httpd, sdk) = ask_async_client, openai_server
    sdk = openai.AsyncOpenAI(base_url=str(sdk.base_url), api_key="test")
    call = lambda: sdk.chat.completions.create(model="gpt-4.1-mini", messages=MSGS)  # noqa: E731
    httpd.mode = status
    with pytest.raises(error):
        loop.run(cache.aget_or_set(MSGS, "gpt-4.1-mini", call, client=aclient))
    assert len(httpd.requests) == 1 + sdk.max_retries
    httpd.mode = "ok"
    answer = loop.run(cache.aget_or_set(MSGS, "gpt-4.1-mini", call, client=aclient))
    assert len(httpd.requests) == 2 + sdk.max_retries  # nothing was cached: the next call went to the server
    assert ChatCompletion.model_validate(answer).usage.total_tokens == 25
    loop.run(sdk.close())
