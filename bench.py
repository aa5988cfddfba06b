"""Measure cache.py against a real Redis: hit cost against the floor, miss overhead, waiters, streams, fail-open.

    python bench.py            # starts its own redis-server on a free port (or uses REDIS_URL)
    python bench.py --quick    # a fast smoke run: fewer rounds, fewer processes
    python bench.py --json     # the same figures as JSON
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
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

import redis
import redis.asyncio

import cache

MSGS = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Summarise the plot of Hamlet in three sentences."}]
COMPLETION = {  # a realistic ~1 KB chat completion
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_760_000_000, "model": "gpt-4.1-mini",
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
FORK = multiprocessing.get_context("fork")


class Counting(redis.Redis):
    """A client that counts the commands it sends: each is one round trip, as nothing here is pipelined."""

    sent = 0

    def execute_command(self, *args, **options):
        self.sent += 1
        return super().execute_command(*args, **options)


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


def server_us(r: redis.Redis) -> dict:
    """Server-side µs and calls so far, per command, from INFO commandstats (not reset: REDIS_URL may be shared)."""
    return {name[len("cmdstat_"):]: (row["usec"], row["calls"]) for name, row in r.info("commandstats").items()}


SORTED = json.JSONEncoder(sort_keys=True).encode  # built once, as json.dumps(sort_keys=True) builds one a call


def sha256_key(messages: list, model: str) -> str:
    """The least a cache keyed by the SHA-256 of the canonical request must do before its GET."""
    return "bench:" + hashlib.sha256(SORTED([model, messages]).encode()).hexdigest()


def hit_vs_floor(url: str, rounds: int, n: int) -> dict:
    r = Counting.from_url(url)
    cache.get_or_set(MSGS, "gpt-4.1-mini", lambda: COMPLETION, client=r)
    r.set("bench:floor", json.dumps(COMPLETION, separators=(",", ":")))
    assert len(r.get("bench:floor")) >= 1000
    r.set(sha256_key(MSGS, "gpt-4.1-mini"), r.get("bench:floor"))
    floors, keyed, hits = [], [], []
    for _ in range(rounds):  # alternate, so all three see the same machine noise
        t = time.perf_counter()
        for _ in range(n):
            json.loads(r.get("bench:floor"))
        floors.append((time.perf_counter() - t) / n * 1e6)
        t = time.perf_counter()
        for _ in range(n):
            json.loads(r.get(sha256_key(MSGS, "gpt-4.1-mini")))
        keyed.append((time.perf_counter() - t) / n * 1e6)
        before = server_us(r)
        sent, t = r.sent, time.perf_counter()
        for _ in range(n):
            cache.get_or_set(MSGS, "gpt-4.1-mini", lambda: COMPLETION, client=r)
        hits.append((time.perf_counter() - t) / n * 1e6)
        hit_trips = (r.sent - sent) / n
        after = server_us(r)
    r.delete("bench:floor", sha256_key(MSGS, "gpt-4.1-mini"))
    (get_us, get_calls), (evalsha_us, _) = after["get"], after["evalsha"]
    return {"floor_us": statistics.median(floors), "keyed_floor_us": statistics.median(keyed),
            "hit_us": statistics.median(hits),
            "ratio": statistics.median(h / f for h, f in zip(hits, floors, strict=True)),
            "keyed_ratio": statistics.median(k / f for k, f in zip(keyed, floors, strict=True)),
            "round_trips_per_hit": hit_trips, "rounds": rounds,
            "server_us_per_get": get_us / get_calls,  # both floors' GETs, over the whole run
            "server_us_per_hit": (evalsha_us - before["evalsha"][0]) / n}  # the hits of the last round


def miss_overhead(url: str, n: int) -> dict:
    r = Counting.from_url(url)
    r.get("warm")
    cache.get_or_set([{"role": "user", "content": "warm"}], "m", lambda: COMPLETION, client=r)  # load scripts
    sent, total = r.sent, 0.0
    for i in range(n):
        t = time.perf_counter()
        question = [{"role": "user", "content": f"miss {i} {random.random()}"}]
        cache.get_or_set(question, "m", lambda: COMPLETION, client=r)
        total += time.perf_counter() - t
    bare = time.perf_counter()
    for _ in range(n):
        json.loads(json.dumps(COMPLETION))  # what a miss must do anyway: hand back what JSON gives
    bare = time.perf_counter() - bare
    return {"round_trips": (r.sent - sent) / n, "overhead_us": (total - bare) / n * 1e6}


def async_hit_vs_floor(url: str, rounds: int, n: int) -> dict:
    async def run() -> dict:
        r = redis.asyncio.Redis.from_url(url)  # one connection: the calls are sequential
        await cache.aget_or_set(MSGS, "gpt-4.1-mini", lambda: COMPLETION, client=r)
        await r.set("bench:afloor", json.dumps(COMPLETION, separators=(",", ":")))
        floors, hits = [], []
        for _ in range(rounds):  # alternate, so both see the same machine noise
            t = time.perf_counter()
            for _ in range(n):
                json.loads(await r.get("bench:afloor"))
            floors.append((time.perf_counter() - t) / n * 1e6)
            t = time.perf_counter()
            for _ in range(n):
                await cache.aget_or_set(MSGS, "gpt-4.1-mini", lambda: COMPLETION, client=r)
            hits.append((time.perf_counter() - t) / n * 1e6)
        await r.delete("bench:afloor")
        await r.aclose()
        return {"floor_us": statistics.median(floors), "hit_us": statistics.median(hits), "rounds": rounds,
                "ratio": statistics.median(h / f for h, f in zip(hits, floors, strict=True))}
    return asyncio.run(run())


def _gaps(ticks: list[float], start: float, end: float) -> float:
    """The longest the loop went without running the ticker, between start and end, in ms."""
    inside = [start] + [t for t in ticks if start < t < end] + [end]
    return max(b - a for a, b in zip(inside, inside[1:], strict=False)) * 1000


def thousand_tasks(url: str, tasks: int = 1000, call: float = 1.0) -> dict:
    """tasks tasks of one loop ask for one request that another worker is calling the model for."""
    question = [{"role": "user", "content": f"tasks {random.random()}"}]
    calls, stored = [], []

    def other_worker() -> None:  # a thread of another worker: its own client, so no coalescing with the tasks
        def call_fn() -> dict:
            calls.append(1)
            time.sleep(call)
            stored.append(time.perf_counter())  # the store follows at once
            return COMPLETION
        cache.get_or_set(question, "m", call_fn, client=redis.Redis.from_url(url))

    async def run() -> dict:
        r, ticks, done = redis.asyncio.Redis.from_url(url), [], []

        async def ticker() -> None:
            while len(done) < tasks:
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.001)

        async def ask() -> None:
            await cache.aget_or_set(question, "m", lambda: calls.append(1) or COMPLETION, client=r)
            done.append(time.perf_counter())

        async def bare(event: asyncio.Event) -> None:  # what any 1000 tasks cost the loop: start, wait, wake
            await event.wait()
            done.append(time.perf_counter())

        event, tick = asyncio.Event(), asyncio.ensure_future(ticker())
        t0 = time.perf_counter()
        base = [asyncio.ensure_future(bare(event)) for _ in range(tasks)]
        await asyncio.sleep(0.1)
        t1 = time.perf_counter()
        event.set()
        await asyncio.gather(*base)
        await tick
        bare_start, bare_wake, ticks, done = _gaps(ticks, t0, t1), _gaps(ticks, t1, done[-1]), [], []
        tick = asyncio.ensure_future(ticker())
        holder = threading.Thread(target=other_worker)
        holder.start()
        while not calls:
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        waiting = [asyncio.ensure_future(ask()) for _ in range(tasks)]
        while not stored:
            await asyncio.sleep(0.001)
        await asyncio.gather(*waiting)
        await tick
        holder.join()
        lags = sorted((d - stored[0]) * 1000 for d in done)
        started = t0 + 0.1  # their first steps are over by then (the call goes on for longer)
        await r.aclose()
        return {"tasks": tasks, "calls": len(calls), "call_s": call, "lag_median_ms": statistics.median(lags),
                "lag_max_ms": lags[-1], "gap_start_ms": _gaps(ticks, t0, started),
                "gap_waiting_ms": _gaps(ticks, started, stored[0]), "gap_wake_ms": _gaps(ticks, stored[0], done[-1]),
                "bare_start_ms": bare_start, "bare_wake_ms": bare_wake}
    return asyncio.run(run())


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


def _crowd_member(url, delay, leader_call, done, start, out):
    r = Counting.from_url(url)
    r.ping()

    def call_fn():
        r2 = redis.Redis.from_url(url)
        r2.incr(cache.PREFIX + "calls")
        time.sleep(leader_call)
        r2.set(cache.PREFIX + "answered", time.monotonic())  # just before get_or_set stores the answer
        return COMPLETION

    start.wait()
    time.sleep(delay)
    began, sent = time.monotonic(), r.sent
    cache.get_or_set(MSGS, "crowd", call_fn, client=r)
    row = {"began": began, "ended": time.monotonic(), "ended_wall": time.time(), "sent": r.sent - sent, "delay": delay}
    done.wait()  # report once every member has its answer, so that reporting slows no one down
    out.put(row)


def crowd(url: str, processes: int, leader_call: float = 1.0, lock_ttl: float | None = None) -> dict:
    """One process leads (its call takes leader_call s); the rest arrive at random moments while it runs.

    A waiter's lag runs from the store (the time in the ID of the stream entry that wakes the waiters) to its
    own return; lag_from_call is from the moment the leader's call returned, before it began storing."""
    previous_lock_ttl = cache.LOCK_TTL
    cache.LOCK_TTL = lock_ttl or previous_lock_ttl  # the forked members inherit it
    cache.PREFIX = f"bench:crowd:{processes}:{random.random()}:"
    done = FORK.Barrier(processes)
    delays = [0.0] + [random.uniform(0.05, leader_call * 0.8) for _ in range(processes - 1)]
    rows = _released_together([(_crowd_member, url, d, leader_call, done) for d in delays])
    cache.LOCK_TTL = previous_lock_ttl
    leader = min(rows, key=lambda row: row["delay"])
    waiters = [row for row in rows if row is not leader]
    r = redis.Redis.from_url(url)
    answered = float(r.get(cache.PREFIX + "answered"))  # monotonic, and the clock is system-wide
    stored_ms = int(r.xrevrange(cache._keys(MSGS, "crowd", None)[2], count=1)[0][0].split(b"-")[0])
    lags = [row["ended_wall"] * 1000 - stored_ms for row in waiters]  # the ID's whole ms: up to 1 ms too long
    lags_from_call = [(row["ended"] - answered) * 1000 for row in waiters]
    rates = [row["sent"] / (row["ended"] - row["began"]) for row in waiters]
    return {"processes": processes, "call_s": leader_call, "lock_ttl_s": lock_ttl or cache.LOCK_TTL,
            "calls": int(r.get(cache.PREFIX + "calls")),
            "lag_median_ms": statistics.median(lags), "lag_max_ms": max(lags),
            "lag_from_call_median_ms": statistics.median(lags_from_call), "lag_from_call_max_ms": max(lags_from_call),
            "commands_per_waiter_per_s": statistics.median(rates), "commands_per_waiter_per_s_max": max(rates)}


def _streamer(url, chunks, gap, start, out):
    r = redis.Redis.from_url(url)
    r.ping()
    sent: list[float] = []  # when the model sent each chunk, if this process called it

    def model():
        r.incr(cache.PREFIX + "calls")
        for i in range(chunks):
            time.sleep(gap)  # the model sends a chunk every gap s
            sent.append(time.monotonic())
            yield {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4.1-mini",
                   "choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}]}

    start.wait()
    began, times, got = time.monotonic(), [], []
    for chunk in cache.get_or_set(MSGS, "stream", model, client=r):
        times.append(time.monotonic())
        got.append(chunk)
    out.put({"began": began, "times": times, "sent": sent, "chunks": json.dumps(got)})


def stream_followers(url: str, followers: int = 16, chunks: int = 40, gap: float = 0.025) -> dict:
    """followers + 1 processes ask for one streamed answer at once: one leads, the others follow it live.

    A chunk's lag is from the moment the model sent it (to the leader) to the moment a caller got it (the
    monotonic clock is system-wide); time to first chunk is from each caller's call of get_or_set."""
    cache.PREFIX = f"bench:stream:{random.random()}:"
    rows = _released_together([(_streamer, url, chunks, gap)] * (followers + 1))
    leader = next(row for row in rows if row["sent"])
    rest = [row for row in rows if row is not leader]
    lags = [(row["times"][i] - leader["sent"][i]) * 1000 for row in rest for i in range(chunks)]
    own = [(leader["times"][i] - leader["sent"][i]) * 1000 for i in range(chunks)]
    return {"leader_lag_median_ms": statistics.median(own),
            "followers": len(rest), "chunks": chunks, "gap_s": gap,
            "calls": int(redis.Redis.from_url(url).get(cache.PREFIX + "calls")),
            "identical": all(row["chunks"] == leader["chunks"] for row in rest),
            "lag_median_ms": statistics.median(lags), "lag_max_ms": max(lags),
            "first_chunk_leader_ms": (leader["times"][0] - leader["began"]) * 1000,
            "first_chunk_followers_median_ms": statistics.median((r["times"][0] - r["began"]) * 1000 for r in rest),
            "first_chunk_followers_max_ms": max((r["times"][0] - r["began"]) * 1000 for r in rest)}


def small_pools(url: str, threads: int = 32, call: float = 0.5, max_connections: int = 4) -> dict:
    """threads of one process ask one request at once through a pool of max_connections, of each kind."""
    return {pool_class.__name__: _small_pool(url, pool_class, threads, call, max_connections)
            for pool_class in (redis.ConnectionPool, redis.BlockingConnectionPool)}


def _small_pool(url: str, pool_class: type, threads: int, call: float, max_connections: int) -> dict:
    cache.PREFIX = f"bench:pool:{random.random()}:"
    r = redis.Redis(connection_pool=pool_class.from_url(url, max_connections=max_connections))
    calls, latencies, barrier = [], [], threading.Barrier(threads)

    def call_fn():
        calls.append(1)
        time.sleep(call)
        return COMPLETION

    def ask():
        barrier.wait()
        t = time.perf_counter()
        cache.get_or_set(MSGS, "pool", call_fn, client=r)
        latencies.append(time.perf_counter() - t)

    workers = [threading.Thread(target=ask) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    r.close()
    return {"threads": threads, "max_connections": max_connections, "call_s": call,
            "calls": len(calls), "answered": len(latencies), "worst_over_call_ms": (max(latencies) - call) * 1000}


def _holder(url, start):
    r = redis.Redis.from_url(url)

    def call_fn():
        r.set(cache.PREFIX + "holding", time.monotonic())
        time.sleep(3600)

    start.wait()
    cache.get_or_set(MSGS, "killed", call_fn, client=r)


def _late_waiter(url, call, start, out):
    r = redis.Redis.from_url(url)
    start.wait()
    cache.get_or_set(MSGS, "killed", lambda: (time.sleep(call), COMPLETION)[1], client=r)
    out.put(time.monotonic())


def killed_holder(url: str, lock_ttl: float, call: float = 0.2, waiters: int = 8) -> dict:
    """The lock holder is SIGKILLed inside its call, after renewing its lock: when do the waiters get their answer?"""
    previous_lock_ttl = cache.LOCK_TTL
    cache.PREFIX, cache.LOCK_TTL = f"bench:killed:{random.random()}:", lock_ttl
    r = redis.Redis.from_url(url)
    start, out = FORK.Event(), FORK.Queue()
    holder = FORK.Process(target=_holder, args=(url, start))
    holder.start()
    procs = [FORK.Process(target=_late_waiter, args=(url, call, start, out)) for _ in range(waiters)]
    start.set()
    while r.get(cache.PREFIX + "holding") is None:
        time.sleep(0.001)
    for p in procs:
        p.start()
    time.sleep(lock_ttl / 2)  # killed at a random point of its renewal cycle, not right after taking the lock
    holder.kill()
    killed = time.monotonic()
    answered = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    cache.LOCK_TTL = previous_lock_ttl
    return {"lock_ttl_s": lock_ttl, "call_s": call, "waiters": waiters,
            "last_answer_after_kill_s": max(answered) - killed, "bound_s": lock_ttl + call + 0.5}


def fail_open(port: int, proc: subprocess.Popen | None, calls: int) -> dict:
    """Cost of cache.get_or_set over a bare call, with Redis refusing connections and with Redis frozen."""
    result = {}
    refused_url = f"redis://127.0.0.1:{free_port()}/0"
    for name, url in (("refused", refused_url), ("frozen", f"redis://127.0.0.1:{port}/0")):
        if name == "frozen":
            if proc is None:
                continue
            proc.send_signal(signal.SIGSTOP)
        os.environ["REDIS_URL"] = url  # the module's own client, with its short timeouts
        for path in ("sync", "async"):
            times = asyncio.run(_fail_open_async(name, calls)) if path == "async" else []
            for i in range(calls if path == "sync" else 0):
                t = time.perf_counter()
                cache.get_or_set([{"role": "user", "content": f"{name} {i}"}], "m", lambda: "answer")
                times.append(time.perf_counter() - t)
            cache._down_until.clear()  # each path meets the outage afresh
            result[f"{name} ({path})"] = {"calls": calls, "first_call_ms": times[0] * 1000, "total_s": sum(times),
                                          "median_call_us": statistics.median(times) * 1e6}
        if name == "frozen":
            proc.send_signal(signal.SIGCONT)
    os.environ.pop("REDIS_URL", None)
    return result


async def _fail_open_async(name: str, calls: int) -> list[float]:
    times = []
    for i in range(calls):
        t = time.perf_counter()
        await cache.aget_or_set([{"role": "user", "content": f"{name} async {i}"}], "m", lambda: "answer")
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    given = os.environ.pop("REDIS_URL", None)
    proc = None
    if given:
        url, port = given, None
    else:
        if not shutil.which("redis-server"):
            raise SystemExit("bench.py needs redis-server on PATH, or REDIS_URL")
        proc, port = start_server()
        url = f"redis://127.0.0.1:{port}/0"
    cache.PREFIX = f"bench:{random.random()}:"
    import logging
    logging.getLogger("cache").setLevel(logging.ERROR)  # the fail-open runs warn by design
    try:
        figures = {"redis": redis.Redis.from_url(url).info("server")["redis_version"],
                   "hit": hit_vs_floor(url, rounds=5 if args.quick else 9, n=300 if args.quick else 3000),
                   "async_hit": async_hit_vs_floor(url, rounds=5 if args.quick else 9, n=300 if args.quick else 3000),
                   "tasks": thousand_tasks(url, call=0.3 if args.quick else 1.0),
                   "miss": miss_overhead(url, n=100 if args.quick else 1000),
                   "crowds": [crowd(url, n) for n in ((4,) if args.quick else (16, 64))],
                   "long_call": crowd(url, 4 if args.quick else 16, *((1.0, 0.1) if args.quick else (5.0, 0.5))),
                   "pools": small_pools(url),
                   "stream": stream_followers(url, 4 if args.quick else 16, 10 if args.quick else 40),
                   "killed_holder": killed_holder(url, 2.0 if args.quick else cache.LOCK_TTL),
                   "fail_open": fail_open(port, proc, calls=100) if port else {}}
    finally:
        if proc:
            proc.kill()
            proc.wait()
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    h, m = figures["hit"], figures["miss"]
    print(f"redis-server {figures['redis']}, loopback, redis-py {redis.__version__}, 1 KB chat completion")
    print(f"{'floor (GET + json.loads)':34} {h['floor_us']:8.1f} us")
    print(f"{'floor + hashing the request':34} {h['keyed_floor_us']:8.1f} us   ratio {h['keyed_ratio']:.2f}x  "
          f"(GET by the request's SHA-256: the least a cache can do)")
    print(f"{'hit (get_or_set)':34} {h['hit_us']:8.1f} us   ratio {h['ratio']:.2f}x  "
          f"(median of {h['rounds']} alternating rounds; {h['round_trips_per_hit']:.0f} round trip per hit)")
    print(f"{'  of which in redis-server':34} {h['server_us_per_hit']:8.1f} us   "
          f"(a GET: {h['server_us_per_get']:.1f} us)")
    a = figures["async_hit"]
    print(f"{'async floor (await GET + loads)':34} {a['floor_us']:8.1f} us")
    print(f"{'async hit (aget_or_set)':34} {a['hit_us']:8.1f} us   ratio {a['ratio']:.2f}x  "
          f"(median of {a['rounds']} alternating rounds)")
    print(f"{'miss overhead (minus call_fn)':34} {m['overhead_us']:8.1f} us   {m['round_trips']:.0f} round trips")
    for c in figures["crowds"]:
        print(f"{c['processes']:3d} processes, one request, 1 s call: {c['calls']} call_fn call(s); waiters return "
              f"after the store: median {c['lag_median_ms']:.1f} ms, max {c['lag_max_ms']:.1f} ms (after the call "
              f"returned: {c['lag_from_call_median_ms']:.1f}, {c['lag_from_call_max_ms']:.1f}); commands per waiter "
              f"per s median {c['commands_per_waiter_per_s']:.1f}, max {c['commands_per_waiter_per_s_max']:.1f}")
    c = figures["long_call"]
    print(f"{c['processes']:3d} processes, a {c['call_s']:.0f} s call, LOCK_TTL {c['lock_ttl_s']} s: {c['calls']} "
          f"call_fn call(s); waiters return after the store: median {c['lag_median_ms']:.1f} ms, "
          f"max {c['lag_max_ms']:.1f} ms")
    for name, p in figures["pools"].items():
        print(f"{p['threads']} threads, one request, {p['call_s']} s call, {name}(max_connections="
              f"{p['max_connections']}): {p['calls']} call_fn call(s), {p['answered']} answered, worst latency "
              f"{p['worst_over_call_ms']:.1f} ms over the call")
    t = figures["tasks"]
    print(f"{t['tasks']} tasks of one loop, one request, another worker's {t['call_s']:g} s call: {t['calls']} "
          f"call_fn call(s); tasks return after the store: median {t['lag_median_ms']:.1f} ms, max "
          f"{t['lag_max_ms']:.1f} ms; worst ticker gap while they wait {t['gap_waiting_ms']:.1f} ms, as they start "
          f"{t['gap_start_ms']:.1f} ms, as they wake {t['gap_wake_ms']:.1f} ms (1000 bare tasks on an Event: "
          f"{t['bare_start_ms']:.1f} and {t['bare_wake_ms']:.1f} ms)")
    f = figures["stream"]
    print(f"{f['followers'] + 1} processes, one streamed request, {f['chunks']} chunks {f['gap_s'] * 1000:.0f} ms "
          f"apart: {f['calls']} call_fn call(s), chunks identical: {f['identical']}")
    print(f"  a chunk reaches the {f['followers']} followers after the model sent it: median "
          f"{f['lag_median_ms']:.1f} ms, max {f['lag_max_ms']:.1f} ms (the leader: median "
          f"{f['leader_lag_median_ms']:.1f} ms)")
    print(f"  first chunk after the call: leader {f['first_chunk_leader_ms']:.1f} ms, followers median "
          f"{f['first_chunk_followers_median_ms']:.1f} ms, max {f['first_chunk_followers_max_ms']:.1f} ms")
    k = figures["killed_holder"]
    print(f"holder SIGKILLed in its call (LOCK_TTL {k['lock_ttl_s']:.0f} s, call {k['call_s']} s): {k['waiters']} "
          f"waiters answered {k['last_answer_after_kill_s']:.2f} s after the kill (bound {k['bound_s']:.1f} s)")
    for name, f in figures["fail_open"].items():
        print(f"Redis {name:15}: {f['calls']} calls in {f['total_s'] * 1000:.0f} ms; first call "
              f"{f['first_call_ms']:.1f} ms, median call {f['median_call_us']:.0f} us")


if __name__ == "__main__":
    main()
