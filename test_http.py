"""The HTTP layer: the real SDKs (openai, anthropic, instructor, LangChain) over cache.http_client() and friends,
against fake_llm's API and a real redis-server. Forked children make SDK clients of their own."""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
import warnings

import anthropic
import fakeredis
import httpx
import httpx2
import instructor
import openai
import pydantic
import pytest
import redis
import redis.asyncio
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ParsedChatCompletion
from openai.types.responses import Response

import cache
from conftest import FORK, _free_port, _in_threads, async_twin, counting
from fake_llm import FakeLLM

KEY = "sk-secret-123"  # must never reach Redis
GPT, CLAUDE = "gpt-4o-mini", "claude-sonnet-4-5"
MSGS = [{"role": "user", "content": "Capital of France?"}]


class City(pydantic.BaseModel):
    name: str
    country: str


@pytest.fixture
def srv():
    s = FakeLLM().start()
    yield s
    s.stop()


@pytest.fixture
def r(real_url):
    c = redis.Redis.from_url(real_url)
    yield c
    c.close()


# ---------------------------------------------------------------- SDK clients over the cache

def _openai(url, r):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, http_client=cache.http_client(client=r))


def _aopenai(url, ar):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0,
                              http_client=cache.async_http_client(client=ar))


def _anthropic(url, r):
    return anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, http_client=cache.http_client(client=r))


def _aanthropic(url, ar):
    return anthropic.AsyncAnthropic(base_url=url, api_key=KEY, max_retries=0,
                                    http_client=cache.async_http_client(client=ar))


def _chat(oc, **kw):
    """A chat completion's text and its x-llm-cache header."""
    raw = oc.chat.completions.with_raw_response.create(model=GPT, messages=MSGS, **kw)
    return raw.parse().choices[0].message.content, raw.headers["x-llm-cache"]


def _echo(srv, n):
    return f"echo {n}@{srv.port}: Capital of France?"


# ---------------------------------------------------------------- each SDK call: (answer, x-llm-cache), any process

def _create(url, redis_url):
    raw = _openai(url, redis.Redis.from_url(redis_url)).chat.completions.with_raw_response.create(
        model=GPT, messages=MSGS)
    return raw.parse(), raw.headers["x-llm-cache"]


def _parse(url, redis_url):
    raw = _openai(url, redis.Redis.from_url(redis_url)).chat.completions.with_raw_response.parse(
        model=GPT, messages=MSGS, response_format=City)
    return raw.parse(), raw.headers["x-llm-cache"]


def _completion(url, redis_url):
    raw = _openai(url, redis.Redis.from_url(redis_url)).completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="Capital of France?")
    return raw.parse(), raw.headers["x-llm-cache"]


def _embedding(url, redis_url):
    raw = _openai(url, redis.Redis.from_url(redis_url)).embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["Paris", "Lyon"])
    return raw.parse(), raw.headers["x-llm-cache"]


def _response(url, redis_url):
    raw = _openai(url, redis.Redis.from_url(redis_url)).responses.with_raw_response.create(
        model=GPT, input="Capital of France?")
    return raw.parse(), raw.headers["x-llm-cache"]


def _message(url, redis_url):
    raw = _anthropic(url, redis.Redis.from_url(redis_url)).messages.with_raw_response.create(
        model=CLAUDE, max_tokens=50, messages=MSGS)
    return raw.parse(), raw.headers["x-llm-cache"]


def _message_stream(url, redis_url):
    with _anthropic(url, redis.Redis.from_url(redis_url)).messages.stream(
            model=CLAUDE, max_tokens=50, messages=MSGS) as stream:
        return stream.get_final_message(), stream.response.headers["x-llm-cache"]


def _instructor(url, redis_url):
    seen = []  # instructor returns the model only: the header comes from the client's event hook
    http = cache.http_client(client=redis.Redis.from_url(redis_url), event_hooks={"response": [seen.append]})
    client = instructor.from_openai(openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, http_client=http))
    city = client.chat.completions.create(model=GPT, response_model=City, messages=MSGS, max_retries=0)
    return city, seen[-1].headers["x-llm-cache"]


def _invoke(url, redis_url):
    llm = ChatOpenAI(model=GPT, base_url=url + "/v1", api_key=KEY, max_retries=0, include_response_headers=True,
                     http_client=cache.http_client(client=redis.Redis.from_url(redis_url)))
    message = llm.invoke("Capital of France?")
    return message, message.response_metadata["headers"]["x-llm-cache"]


def _ainvoke(url, redis_url):
    async def ainvoke():
        ar = redis.asyncio.Redis.from_url(redis_url)
        llm = ChatOpenAI(model=GPT, base_url=url + "/v1", api_key=KEY, max_retries=0, include_response_headers=True,
                         http_client=cache.http_client(client=redis.Redis.from_url(redis_url)),
                         http_async_client=cache.async_http_client(client=ar))
        message = await llm.ainvoke("Capital of France?")
        await ar.aclose()
        return message, message.response_metadata["headers"]["x-llm-cache"]
    return asyncio.run(ainvoke())


CALLS = {  # name: (the call, the type it answers in)
    "openai chat.completions.create": (_create, ChatCompletion),
    "openai chat.completions.parse": (_parse, ParsedChatCompletion),
    "openai completions.create": (_completion, Completion),
    "openai embeddings.create": (_embedding, CreateEmbeddingResponse),
    "openai responses.create": (_response, Response),
    "anthropic messages.create": (_message, anthropic.types.Message),
    "anthropic messages.stream": (_message_stream, anthropic.types.Message),
    "instructor create(response_model=)": (_instructor, City),
    "langchain invoke": (_invoke, AIMessage),
    "langchain ainvoke": (_ainvoke, AIMessage),
}


def _view(answer):
    """An answer as a child process can send it: its type's name and its value."""
    value = answer.model_dump(warnings=False)  # ParsedChatCompletion's parsed warns
    if isinstance(answer, AIMessage):  # LangChain's run id and the response's headers (date, x-llm-cache) vary
        del value["id"], value["response_metadata"]["headers"]
    return f"{type(answer).__module__}.{type(answer).__qualname__}", value


def _viewed(call, url, redis_url):
    answer, outcome = call(url, redis_url)
    return _view(answer), outcome


def _send(queue, fn, *args):
    try:
        queue.put((True, fn(*args)))
    except BaseException as e:  # the test shows it
        queue.put((False, repr(e)))


def _elsewhere(fn, *args):
    """fn(*args) in a forked process, which returns it through a queue."""
    queue = FORK.Queue()
    process = FORK.Process(target=_send, args=(queue, fn, *args))
    process.start()
    ok, result = queue.get(timeout=60)
    process.join(60)
    assert ok, result
    return result


@pytest.mark.parametrize("name", CALLS)
def test_a_miss_then_a_hit_from_another_process_in_the_sdks_own_type(name, srv, real_url):
    call, kind = CALLS[name]
    first, outcome = call(srv.url, real_url)
    (kind_there, value_there), outcome_there = _elsewhere(_viewed, call, srv.url, real_url)
    assert isinstance(first, kind)
    assert (kind_there, value_there) == _view(first)
    assert (outcome, outcome_there) == ("miss", "hit")
    assert srv.count == 1


# ---------------------------------------------------------------- streams: relayed, followed live, replayed

STREAMS = ["openai chat", "openai responses", "anthropic messages.stream"]


def _open(kind, url, r):
    """A stream, to enter with `with`; iterating it gives the SDK's events, .response the HTTP response."""
    if kind == "openai chat":
        return _openai(url, r).chat.completions.create(model=GPT, messages=MSGS, stream=True)
    if kind == "openai responses":
        return _openai(url, r).responses.create(model=GPT, input="Capital of France?", stream=True)
    return _anthropic(url, r).messages.stream(model=CLAUDE, max_tokens=50, messages=MSGS)


async def _aopen(kind, url, ar):
    """_open's twin, to enter with `async with await`."""
    if kind == "openai chat":
        return await _aopenai(url, ar).chat.completions.create(model=GPT, messages=MSGS, stream=True)
    if kind == "openai responses":
        return await _aopenai(url, ar).responses.create(model=GPT, input="Capital of France?", stream=True)
    return _aanthropic(url, ar).messages.stream(model=CLAUDE, max_tokens=50, messages=MSGS)


def _read(kind, url, r):
    """A whole stream: its events' values and its x-llm-cache header."""
    with _open(kind, url, r) as stream:
        return [event.model_dump() for event in stream], stream.response.headers["x-llm-cache"]


def _follow(queue, go, kind, url, redis_url):
    """Reads the stream in a child, once told to go: sends its first event as soon as it has it, then all of them
    and the header."""
    try:
        go.wait(30)
        with _open(kind, url, redis.Redis.from_url(redis_url)) as stream:
            events = []
            for event in stream:
                events.append(event.model_dump())
                if len(events) == 1:
                    queue.put(events[0])
            queue.put((events, stream.response.headers["x-llm-cache"]))
    except BaseException as e:
        queue.put(repr(e))


@pytest.mark.parametrize("kind", STREAMS)
def test_a_stream_is_relayed_followed_live_by_another_process_and_replayed(kind, srv, r, real_url):
    queue, go = FORK.Queue(), FORK.Event()
    follower = FORK.Process(target=_follow, args=(queue, go, kind, srv.url, real_url))
    follower.start()
    with _open(kind, srv.url, r) as stream:
        events = iter(stream)
        first = next(events)
        go.set()
        followed_first = queue.get(timeout=30)  # live, from the leader, which holds the rest back till then
        led = [first.model_dump()] + [event.model_dump() for event in events]
        outcome = stream.response.headers["x-llm-cache"]
    followed = queue.get(timeout=30)
    follower.join(30)
    replayed = _read(kind, srv.url, r)
    assert followed_first == led[0]
    assert (led, outcome) == (followed[0], "miss")
    assert followed == replayed == (led, "hit")
    assert srv.count == 1


def test_a_process_forked_while_its_parent_leads_a_stream_follows_it(srv, r, real_url):
    queue, go = FORK.Queue(), FORK.Event()
    go.set()
    with _open("openai chat", srv.url, r) as stream:
        events = iter(stream)
        first = next(events)
        follower = FORK.Process(target=_follow, args=(queue, go, "openai chat", srv.url, real_url))
        follower.start()  # forked from the leading thread: the child leads nothing
        followed_first = queue.get(timeout=30)
        list(events)
    followed = queue.get(timeout=30)
    follower.join(30)
    assert followed_first == first.model_dump()
    assert followed[1] == "hit"
    assert srv.count == 1


@pytest.mark.parametrize("kind", STREAMS)
def test_an_async_stream_is_relayed_followed_live_and_replayed(kind, srv, real_url):
    async def follow(go, first_in):
        await go.wait()
        ar = redis.asyncio.Redis.from_url(real_url)
        async with await _aopen(kind, srv.url, ar) as stream:
            events = []
            async for event in stream:
                events.append(event.model_dump())
                first_in.set()
            outcome = stream.response.headers["x-llm-cache"]
        await ar.aclose()
        return events, outcome

    async def main():
        ar, go, first_in = redis.asyncio.Redis.from_url(real_url), asyncio.Event(), asyncio.Event()
        # made before the leader leads: a task made while it streams would inherit its context, and count as its own
        follower = asyncio.create_task(follow(go, first_in))
        async with await _aopen(kind, srv.url, ar) as stream:
            events = stream.__aiter__()
            led = [(await events.__anext__()).model_dump()]
            go.set()
            await asyncio.wait_for(first_in.wait(), 30)  # while the leader holds the rest back
            led += [event.model_dump() async for event in events]
            outcome = stream.response.headers["x-llm-cache"]
        followed = await asyncio.wait_for(follower, 30)
        replayed = await follow(go, asyncio.Event())
        await ar.aclose()
        return (led, outcome), followed, replayed

    (led, outcome), followed, replayed = asyncio.run(main())
    assert outcome == "miss"
    assert followed == replayed == (led, "hit")
    assert srv.count == 1


@pytest.mark.parametrize("kind", STREAMS)
@pytest.mark.parametrize("cut", ["clean", "abort"])
def test_a_stream_cut_before_its_final_event_is_not_stored(kind, cut, srv, r):
    srv.cut = cut
    if cut == "abort":  # the connection dropped mid-body: each SDK raises its own way
        dropped = anthropic.APIConnectionError if kind.startswith("anthropic") else httpx2.RemoteProtocolError
        with pytest.raises(dropped):
            _read(kind, srv.url, r)
    else:  # the body ended properly, without the final event: the SDKs end quietly
        _read(kind, srv.url, r)
    srv.cut = None
    assert [_read(kind, srv.url, r)[1] for _ in range(2)] == ["miss", "hit"]
    assert srv.count == 2


@pytest.mark.parametrize("kind", STREAMS)
def test_a_stream_that_carries_an_error_event_is_not_stored(kind, srv, r):
    srv.cut, srv.burst = "error", True  # a 200 whose stream reports an error, then ends with its final event
    with pytest.raises((openai.APIError, anthropic.APIError), match="fake mid-stream error"):
        _read(kind, srv.url, r)
    srv.cut = None
    assert [_read(kind, srv.url, r)[1] for _ in range(2)] == ["miss", "hit"]
    assert srv.count == 2


def test_an_async_stream_left_at_its_finish_reason_and_dropped_is_stored(srv, real_url):
    srv.burst = True  # the finish_reason and data: [DONE] come in one read

    async def main():
        ar = redis.asyncio.Redis.from_url(real_url)
        oc = _aopenai(srv.url, ar)
        stream = await oc.chat.completions.create(model=GPT, messages=MSGS, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                break  # the answer is whole; the stream is dropped unclosed
        del stream, chunk
        for _ in range(1000):  # asyncio closes a dropped stream's generators in tasks, as the collector finds them
            gc.collect()
            await asyncio.sleep(0.01)
            if not await ar.keys(cache.PREFIX + "*:lock"):
                break
        stream = await oc.chat.completions.create(model=GPT, messages=MSGS, stream=True)
        outcome = stream.response.headers["x-llm-cache"]
        await stream.close()
        await ar.aclose()
        return outcome

    assert asyncio.run(main()) == "hit"
    assert srv.count == 1


def test_a_stream_closed_before_its_end_is_not_stored(srv, r):
    with _open("openai chat", srv.url, r) as stream:
        next(iter(stream))
    assert _read("openai chat", srv.url, r)[1] == "miss"
    assert srv.count == 2


# ---------------------------------------------------------------- what the key holds

def test_two_servers_asked_the_same_each_give_their_own_answer(r):
    one, two = FakeLLM().start(), FakeLLM().start()
    try:
        answers = [_chat(_openai(s.url, r)) for s in (one, two, one, two)]
    finally:
        one.stop()
        two.stop()
    assert answers == [(_echo(one, 1), "miss"), (_echo(two, 1), "miss"), (_echo(one, 1), "hit"), (_echo(two, 1), "hit")]
    assert one.count == two.count == 1


def test_a_path_and_a_query_that_spell_another_endpoint_together_are_not_it():
    def model(request):
        return httpx.Response(200, json={"path": request.url.raw_path.decode()})

    http = httpx.Client(transport=cache.Transport(httpx.MockTransport(model), client=fakeredis.FakeRedis()))
    urls = ["https://llm.test/v1/chat/completions?a=1/chat/completions?x",
            "https://llm.test/v1/chat/completions%3Fa=1/chat/completions?x"]  # the same, once its path is decoded
    answers = [http.post(url, json={"model": GPT, "messages": MSGS}) for url in urls]
    assert [(a.headers["x-llm-cache"], a.json()["path"]) for a in answers] == [("miss", url[16:]) for url in urls]


def test_requests_differing_only_in_ignored_fields_hit_and_another_temperature_misses(srv):
    oc = _openai(srv.url, fakeredis.FakeRedis())
    variants = [{}, {"user": "ann"}, {"metadata": {"team": "a"}, "store": True}, {"service_tier": "flex"},
                {"safety_identifier": "u1", "prompt_cache_key": "k1"}, {"temperature": 0.5},
                {"temperature": 0.5, "user": "bob"}]
    assert [_chat(oc, **variant)[1] for variant in variants] == ["miss", "hit", "hit", "hit", "hit", "miss", "hit"]
    assert srv.count == 2
    assert srv.requests[1]["body"]["temperature"] == 0.5


def test_only_version_headers_enter_the_key(srv):
    r = fakeredis.FakeRedis()

    def ask(api_key=KEY, **headers):
        client = anthropic.Anthropic(base_url=srv.url, api_key=api_key, max_retries=0,
                                     http_client=cache.http_client(client=r))
        raw = client.messages.with_raw_response.create(model=CLAUDE, max_tokens=50, messages=MSGS,
                                                       extra_headers=headers)
        return raw.headers["x-llm-cache"]

    outcomes = [ask(), ask(api_key="sk-someone-else"), ask(**{"x-trace-id": "t1"}),
                ask(**{"anthropic-beta": "some-beta"}), ask(**{"anthropic-version": "2023-06-01"})]
    assert outcomes == ["miss", "hit", "hit", "miss", "miss"]
    assert srv.count == 3


def test_no_api_key_reaches_redis(srv, r, real_url):
    for call, _ in CALLS.values():
        call(srv.url, real_url)
    for kind in STREAMS:
        _read(kind, srv.url, r)
    cache.stats(client=r)  # this process's hit counts, sent
    stored = repr([(key, _value(r, key)) for key in r.scan_iter(cache.PREFIX + "*")])
    assert "echo 1@" in stored  # the answers are there
    assert all(req["headers"]["authorization"] == f"Bearer {KEY}" for req in srv.requests)
    assert "secret" not in stored


def _value(r, key):
    kind = r.type(key)
    return {b"string": r.get, b"hash": r.hgetall, b"stream": r.xrange, b"none": lambda key: None}[kind](key)


# ---------------------------------------------------------------- answers not stored

ERRORS = {400: "BadRequestError", 429: "RateLimitError", 500: "InternalServerError"}


def _ask_for_error(sdk, url, r):
    if sdk == "anthropic":
        return _anthropic(url, r).messages.create(model=CLAUDE, max_tokens=50, messages=MSGS)
    return _openai(url, r).chat.completions.create(model=GPT, messages=MSGS, stream=sdk == "openai stream")


@pytest.mark.parametrize("status", ERRORS)
@pytest.mark.parametrize("sdk", ["openai", "openai stream", "anthropic"])
def test_error_answers_are_not_stored_and_the_sdk_raises_its_own_error_each_time(sdk, status, srv, r):
    module = anthropic if sdk == "anthropic" else openai
    srv.errors = [status, status]
    raised = []
    for _ in range(2):
        with pytest.raises(getattr(module, ERRORS[status])) as error:
            _ask_for_error(sdk, srv.url, r)
        raised.append(error.value.response.headers["x-llm-cache"])
    assert raised == ["bypass", "bypass"]
    assert srv.count == 2  # the second error came from the server too


def test_an_sdk_retry_after_a_429_is_stored(srv, r):
    srv.errors = [429]
    oc = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=1, http_client=cache.http_client(client=r))
    assert [_chat(oc) for _ in range(2)] == [(_echo(srv, 2), "miss"), (_echo(srv, 2), "hit")]
    assert srv.count == 2


# ---------------------------------------------------------------- Redis down: every call answers

def _calls(url, r):
    """Two chat completions and an Anthropic stream: (text, x-llm-cache) each."""
    answers = [_chat(_openai(url, r)) for _ in range(2)]
    with _anthropic(url, r).messages.stream(model=CLAUDE, max_tokens=50, messages=MSGS) as stream:
        answers.append((stream.get_final_text(), stream.response.headers["x-llm-cache"]))
    return answers


async def _acalls(url, ar):
    answers = []
    for _ in range(2):
        raw = await _aopenai(url, ar).chat.completions.with_raw_response.create(model=GPT, messages=MSGS)
        answers.append((raw.parse().choices[0].message.content, raw.headers["x-llm-cache"]))
    async with _aanthropic(url, ar).messages.stream(model=CLAUDE, max_tokens=50, messages=MSGS) as stream:
        answers.append((await stream.get_final_text(), stream.response.headers["x-llm-cache"]))
    return answers


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_with_no_redis_at_the_url_every_call_answers_and_bypasses(mode, srv, monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{_free_port()}/0")  # nothing listens there
    answers = _calls(srv.url, None) if mode == "sync" else asyncio.run(_acalls(srv.url, None))
    assert answers == [(_echo(srv, n), "bypass") for n in (1, 2, 3)]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_with_redis_killed_every_call_answers_and_bypasses(mode, srv, server):
    r = server.client(retry=redis.retry.Retry(redis.backoff.NoBackoff(), 1))  # redis-py's default backs off for 5 s
    assert _chat(_openai(srv.url, r)) == (_echo(srv, 1), "miss")
    server.kill()
    answers = _calls(srv.url, r) if mode == "sync" else asyncio.run(_acalls(srv.url, async_twin(r)))
    assert answers == [(_echo(srv, n), "bypass") for n in (2, 3, 4)]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_with_redis_refusing_writes_a_cached_answer_hits_and_a_new_one_bypasses(mode, srv, server):
    r = server.client()
    assert _chat(_openai(srv.url, r)) == (_echo(srv, 1), "miss")
    r.replicaof("127.0.0.1", _free_port())  # a read-only replica of nothing: it serves reads, refuses writes

    async def achat(**kw):
        raw = await _aopenai(srv.url, async_twin(r)).chat.completions.with_raw_response.create(
            model=GPT, messages=MSGS, **kw)
        return raw.parse().choices[0].message.content, raw.headers["x-llm-cache"]

    ask = _chat if mode == "sync" else lambda oc, **kw: asyncio.run(achat(**kw))
    oc = _openai(srv.url, r)
    assert ask(oc) == (_echo(srv, 1), "hit")
    assert ask(oc, temperature=0.5) == (_echo(srv, 2), "bypass")  # answered, but not stored
    assert ask(oc, temperature=0.5) == (_echo(srv, 3), "bypass")


# ---------------------------------------------------------------- one call for many callers

def test_8_threads_sending_one_request_make_one_call(srv, r):
    srv.delay = 0.3  # so that they overlap
    oc = _openai(srv.url, r)
    answers = _in_threads(8, lambda: _chat(oc))
    assert sorted(answers) == [(_echo(srv, 1), "hit")] * 7 + [(_echo(srv, 1), "miss")]
    assert srv.count == 1


def test_8_processes_sending_one_request_make_one_call(srv, real_url):
    srv.delay = 0.3
    go, queue = FORK.Event(), FORK.Queue()

    def one():
        go.wait(30)
        return _chat(_openai(srv.url, redis.Redis.from_url(real_url)))

    processes = [FORK.Process(target=_send, args=(queue, one)) for _ in range(8)]
    for process in processes:
        process.start()
    go.set()
    answers = [queue.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(30)
    assert sorted(answers) == [(True, (_echo(srv, 1), "hit"))] * 7 + [(True, (_echo(srv, 1), "miss"))]
    assert srv.count == 1


# ---------------------------------------------------------------- Cache-Control

def _control(value):
    return {"extra_headers": {"Cache-Control": value}}


def test_cache_control_no_store_calls_and_neither_reads_nor_stores(srv, r):
    oc = _openai(srv.url, r)
    answers = [_chat(oc, **_control("no-store")), _chat(oc), _chat(oc, **_control("no-store")), _chat(oc)]
    assert answers == [(_echo(srv, 1), "bypass"), (_echo(srv, 2), "miss"), (_echo(srv, 3), "bypass"),
                       (_echo(srv, 2), "hit")]


def test_cache_control_no_cache_calls_and_replaces_the_answer(srv, r):
    oc = _openai(srv.url, r)
    answers = [_chat(oc), _chat(oc, **_control("no-cache")), _chat(oc)]
    assert answers == [(_echo(srv, 1), "miss"), (_echo(srv, 2), "miss"), (_echo(srv, 2), "hit")]


def test_cache_control_no_cache_is_still_one_call_for_many_callers(srv, r):
    oc = _openai(srv.url, r)
    _chat(oc)
    srv.delay = 0.5  # so that they overlap: one that came after the new answer was stored would call again
    answers = _in_threads(4, lambda: _chat(oc, **_control("no-cache")))
    assert sorted(answers) == [(_echo(srv, 2), "hit")] * 3 + [(_echo(srv, 2), "miss")]
    assert srv.count == 2


def test_cache_control_no_cache_is_obeyed_while_the_pool_has_no_connection_free(srv, real_url):
    r = redis.Redis.from_url(real_url, max_connections=1)
    oc = _openai(srv.url, r)
    assert _chat(oc) == (_echo(srv, 1), "miss")
    held = r.connection_pool.get_connection()
    threading.Timer(0.2, r.connection_pool.release, [held]).start()  # another user's, for 0.2 s
    assert _chat(oc, **_control("no-cache")) == (_echo(srv, 2), "miss")


def test_cache_control_max_age_refreshes_an_older_answer(srv, r):
    oc = _openai(srv.url, r)
    young = [_chat(oc), _chat(oc, **_control("max-age=3600"))]
    for key in r.scan_iter(cache.PREFIX + "*"):  # stored two hours ago, as far as the entry tells
        if r.type(key) == b"hash" and r.hexists(key, "s"):
            r.hset(key, "s", int(r.hget(key, "s")) - 7200 * 1000)
    old = [_chat(oc, **_control("max-age=86400")), _chat(oc, **_control("max-age=3600")),
           _chat(oc, **_control("max-age=3600")), _chat(oc)]
    assert young == [(_echo(srv, 1), "miss"), (_echo(srv, 1), "hit")]
    assert old == [(_echo(srv, 1), "hit"), (_echo(srv, 2), "miss"), (_echo(srv, 2), "hit"), (_echo(srv, 2), "hit")]


# ---------------------------------------------------------------- what passes through

def test_gets_uploads_and_thread_messages_pass_through_uncached(srv, r):
    oc = _openai(srv.url, r)
    calls = [lambda: oc.models.with_raw_response.retrieve(GPT),
             lambda: oc.files.with_raw_response.create(file=("batch.jsonl", b"{}\n"), purpose="batch"),
             lambda: oc.beta.threads.messages.with_raw_response.create("thread_1", role="user", content="Hi")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the Assistants API's
        outcomes = [call().headers["x-llm-cache"] for call in calls for _ in range(2)]
    assert outcomes == ["bypass"] * 6
    assert [f"{req['method']} {req['path']}" for req in srv.requests[::2]] == [
        f"GET /v1/models/{GPT}", "POST /v1/files", "POST /v1/threads/thread_1/messages"]
    assert srv.count == 6
    assert list(r.scan_iter(cache.PREFIX + "*")) == []


# ---------------------------------------------------------------- plain httpx2 and httpx clients

def _post(http, url):
    answer = http.post(url + "/v1/chat/completions", json={"model": GPT, "messages": MSGS})
    return type(answer), answer.json()["choices"][0]["message"]["content"], answer.headers["x-llm-cache"]


def _stream(http, url):
    with http.stream("POST", url + "/v1/chat/completions", json={"model": GPT, "messages": MSGS, "stream": True}) as s:
        return type(s), list(s.iter_lines())[-2], s.headers["x-llm-cache"]


async def _apost(http, url):
    answer = await http.post(url + "/v1/chat/completions", json={"model": GPT, "messages": MSGS})
    return type(answer), answer.json()["choices"][0]["message"]["content"], answer.headers["x-llm-cache"]


async def _astream(http, url):
    async with http.stream("POST", url + "/v1/chat/completions",
                           json={"model": GPT, "messages": MSGS, "stream": True}) as s:
        return type(s), [line async for line in s.aiter_lines()][-2], s.headers["x-llm-cache"]


@pytest.mark.parametrize("lib", [httpx2, httpx], ids=["httpx2", "httpx"])
def test_a_plain_client_with_the_transport_caches(lib, srv, r):
    http = lib.Client(transport=cache.Transport(client=r))
    answers = [_post(http, srv.url), _post(http, srv.url), _stream(http, srv.url), _stream(http, srv.url)]
    http.close()
    assert answers == [(lib.Response, _echo(srv, 1), "miss"), (lib.Response, _echo(srv, 1), "hit"),
                       (lib.Response, "data: [DONE]", "miss"), (lib.Response, "data: [DONE]", "hit")]
    assert srv.count == 2


@pytest.mark.parametrize("lib", [httpx2, httpx], ids=["httpx2", "httpx"])
def test_a_plain_async_client_with_the_transport_caches(lib, srv, real_url):
    async def main():
        ar = redis.asyncio.Redis.from_url(real_url)
        http = lib.AsyncClient(transport=cache.AsyncTransport(client=ar))
        answers = [await _apost(http, srv.url), await _apost(http, srv.url), await _astream(http, srv.url),
                   await _astream(http, srv.url)]
        await http.aclose()
        await ar.aclose()
        return answers

    assert asyncio.run(main()) == [(lib.Response, _echo(srv, 1), "miss"), (lib.Response, _echo(srv, 1), "hit"),
                                   (lib.Response, "data: [DONE]", "miss"), (lib.Response, "data: [DONE]", "hit")]
    assert srv.count == 2


@pytest.mark.parametrize("lib", [httpx2, httpx], ids=["httpx2", "httpx"])
def test_clients_over_the_transports_work_in_with_blocks(lib, srv, r, real_url):
    with cache.http_client(client=r, library=lib) as http:  # httpx's Client enters and exits its transport
        answer = _post(http, srv.url)

    async def main():
        ar = redis.asyncio.Redis.from_url(real_url)
        async with cache.async_http_client(client=ar, library=lib) as http:
            answer = await _apost(http, srv.url)
        await ar.aclose()
        return answer

    assert [answer, asyncio.run(main())] == [(lib.Response, _echo(srv, 1), "miss"),
                                             (lib.Response, _echo(srv, 1), "hit")]


def test_one_transport_serves_httpx2_and_httpx_clients(srv, r):
    transport = cache.Transport(client=r)
    answers = [_post(httpx2.Client(transport=transport), srv.url), _post(httpx.Client(transport=transport), srv.url),
               _stream(httpx.Client(transport=transport), srv.url)]
    assert answers == [(httpx2.Response, _echo(srv, 1), "miss"), (httpx.Response, _echo(srv, 1), "hit"),
                       (httpx.Response, "data: [DONE]", "miss")]


def test_anthropics_default_clients_take_the_transports(srv, r, real_url):
    client = anthropic.Anthropic(base_url=srv.url, api_key=KEY, max_retries=0,
                                 http_client=anthropic.DefaultHttpxClient(transport=cache.Transport(client=r)))
    outcomes = [client.messages.with_raw_response.create(model=CLAUDE, max_tokens=50, messages=MSGS)
                .headers["x-llm-cache"] for _ in range(2)]

    async def main():
        ar = redis.asyncio.Redis.from_url(real_url)
        http = anthropic.DefaultAsyncHttpxClient(transport=cache.AsyncTransport(client=ar))
        aclient = anthropic.AsyncAnthropic(base_url=srv.url, api_key=KEY, max_retries=0, http_client=http)
        raw = await aclient.messages.with_raw_response.create(model=CLAUDE, max_tokens=50, messages=MSGS)
        await ar.aclose()
        return raw.headers["x-llm-cache"]

    assert outcomes + [asyncio.run(main())] == ["miss", "hit", "hit"]
    assert srv.count == 1


# ---------------------------------------------------------------- tokens saved

TOKENS = {  # name: (the call, the tokens its answer's usage says it cost)
    "chat": (lambda url, r: _chat(_openai(url, r)), 7),
    "chat stream with usage": (lambda url, r: list(_openai(url, r).chat.completions.create(
        model=GPT, messages=MSGS, stream=True, stream_options={"include_usage": True})), 7),
    "embeddings": (lambda url, r: _openai(url, r).embeddings.create(model="text-embedding-3-small", input="Paris"), 3),
    "responses stream": (lambda url, r: _read("openai responses", url, r), 7),
    "anthropic": (lambda url, r: _anthropic(url, r).messages.create(model=CLAUDE, max_tokens=50, messages=MSGS), 7),
    "anthropic stream": (lambda url, r: _read("anthropic messages.stream", url, r), 7),
}


@pytest.mark.parametrize("name", TOKENS)
def test_tokens_saved_come_from_the_answers_usage(name, srv, r):
    call, tokens = TOKENS[name]
    for _ in range(3):
        call(srv.url, r)
    assert cache.stats(client=r) == {"hits": 2, "misses": 1, "tokens_saved": 2 * tokens, "hit_rate": 2 / 3}
    assert srv.count == 1


# ---------------------------------------------------------------- get_or_set(response_model=...)

@pytest.fixture(params=["sync", "async"])
def either(request):
    """get_or_set; or aget_or_set, given the asyncio twin of the fakeredis client passed."""
    if request.param == "sync":
        return cache.get_or_set

    def ask(*args, client, **kw):
        async def run():
            aclient = fakeredis.FakeAsyncRedis(server=client.connection_pool.connection_kwargs["server"])
            try:
                return await cache.aget_or_set(*args, client=aclient, **kw)
            finally:
                await aclient.aclose()
        return asyncio.run(run())
    return ask


def _entries(r):
    return [key for key in r.scan_iter(cache.PREFIX + "*") if r.type(key) == b"hash" and r.hexists(key, "v")]


def test_response_model_a_hit_comes_back_as_the_model(either):
    r, call_fn = fakeredis.FakeRedis(server=fakeredis.FakeServer()), counting(City(name="Paris", country="France"))
    answers = [either(MSGS, GPT, call_fn, client=r, response_model=City) for _ in range(2)]
    from_dict = either(MSGS, "o3", lambda: {"name": "Lyon", "country": "France"}, client=r, response_model=City)
    assert [type(answer) for answer in answers] == [City, City]
    assert answers == [City(name="Paris", country="France")] * 2
    assert call_fn.calls == 1
    assert from_dict == City(name="Lyon", country="France")


def test_response_model_a_model_with_other_fields_misses(either):
    r, call_fn = fakeredis.FakeRedis(server=fakeredis.FakeServer()), counting({"name": "Paris", "country": "France"})

    class Grown(City):
        population: int = 0

    answers = [either(MSGS, GPT, call_fn, client=r, response_model=shape) for shape in (City, Grown, City, Grown)]
    assert [type(answer) for answer in answers] == [City, Grown, City, Grown]
    assert call_fn.calls == 2


def test_response_model_an_entry_that_does_not_validate_is_a_miss_replaced_with_one_warning(either, caplog):
    class Town(pydantic.BaseModel):  # of this test's own: the warning comes once per model
        name: str
        country: str

    r, call_fn = fakeredis.FakeRedis(server=fakeredis.FakeServer()), counting({"name": "Paris", "country": "France"})
    answers = [either(MSGS, GPT, call_fn, client=r, response_model=Town)]
    with caplog.at_level(logging.WARNING, logger="cache"):
        for _ in range(2):
            [entry] = _entries(r)
            r.hset(entry, "v", json.dumps({"name": "Paris"}))  # an older shape, say
            answers += [either(MSGS, GPT, call_fn, client=r, response_model=Town) for _ in range(2)]
    assert answers == [Town(name="Paris", country="France")] * 5
    assert call_fn.calls == 3  # the first, and once per invalid entry: then it was replaced
    assert [record.getMessage() for record in caplog.records if "Town" in record.getMessage()] == [
        "llm cache: entries that are no valid Town count as misses and are replaced"]


@pytest.mark.parametrize("field, config", [
    (pydantic.Field(alias="fullName"), {}),
    (pydantic.Field(serialization_alias="fullName"), {}),
    (pydantic.Field(serialization_alias="fullName"), {"serialize_by_alias": True}),
    (pydantic.Field(validation_alias=pydantic.AliasChoices("fullName", "name")), {}),
])
def test_response_model_with_aliases_comes_back_from_the_instance_call_fn_returns(either, field, config):
    class Person(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(**config)
        full_name: str = field

    ada = Person.model_validate({"fullName": "Ada", "full_name": "Ada"})
    r, call_fn = fakeredis.FakeRedis(server=fakeredis.FakeServer()), counting(ada)
    answers = [either(MSGS, GPT, call_fn, client=r, response_model=Person) for _ in range(2)]
    assert answers == [ada] * 2
    assert call_fn.calls == 1


def test_response_model_threads_sharing_an_answer_that_is_not_the_model_each_get_its_validation_error(real_url):
    class Count(pydantic.BaseModel):
        n: int

    r = redis.Redis.from_url(real_url)

    def call_fn():
        time.sleep(0.2)  # so that the others follow
        call_fn.calls += 1
        return {"n": "many"}

    call_fn.calls = 0
    errors = _in_threads(4, lambda: cache.get_or_set(MSGS, GPT, call_fn, client=r, response_model=Count))
    assert [type(e) for e in errors] == [pydantic.ValidationError] * 4
    assert all("input_value='many'" in str(e) for e in errors)  # the leader's answer, judged by each
    assert call_fn.calls == 1


def test_an_sdk_object_with_aliased_fields_comes_back_as_its_model_dump_or_as_itself(either):
    wire = {"id": "resp_1", "object": "response", "created_at": 1, "model": GPT, "output": [], "tools": [],
            "parallel_tool_calls": True, "tool_choice": "auto", "status": "completed",
            "text": {"format": {"type": "json_schema", "name": "City", "schema": {"type": "object"}, "strict": True}}}
    response = Response.model_validate(wire)
    r, call_fn = fakeredis.FakeRedis(server=fakeredis.FakeServer()), counting(response)
    plain = [either(MSGS, GPT, call_fn, client=r) for _ in range(2)]
    shaped = [either(MSGS, GPT, call_fn, client=r, response_model=Response) for _ in range(2)]
    assert plain == [response.model_dump(mode="json")] * 2  # "schema_", as the SDK's own model_dump() gives it
    assert shaped == [response] * 2
    assert call_fn.calls == 2  # one per key: response_model's schema is in it
