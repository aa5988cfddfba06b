"""The same request twice through get_or_set, a small workload, and what the cache saved.

    python demo.py   # offline by default: fakeredis in-process and a stand-in model
                     # REDIS_URL makes it use your Redis; OPENAI_API_KEY makes it call OpenAI
"""
from __future__ import annotations

import os
import random
import time
import uuid
from urllib.parse import urlsplit

import redis

import cache

# EXAMPLE list prices, USD per 1M tokens (input, output); check your provider's current prices before relying on them.
EXAMPLE_PRICES = {"gpt-4.1-mini": (0.40, 1.60), "gpt-4.1": (2.00, 8.00), "gpt-4o-mini": (0.15, 0.60)}
QUESTIONS = ["What is the capital of France?", "Explain a Redis hash tag in one sentence.",
             "Give one reason to cache LLM calls."]


def pick_redis() -> redis.Redis:
    url = os.environ.get("REDIS_URL")
    if url:
        try:
            shown = f"{urlsplit(url).hostname}:{urlsplit(url).port or 6379}"  # never print a password
            client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        except ValueError as e:  # "notaurl", or a port that is no number
            print(f"Redis: REDIS_URL is not a Redis URL ({e}); using fakeredis in-process instead")
        else:
            try:
                client.ping()
                print(f"Redis: {shown} (from REDIS_URL)")
                return client
            except redis.RedisError as e:
                print(f"Redis: nothing usable at {shown} ({type(e).__name__}); using fakeredis in-process instead")
    else:
        print("Redis: REDIS_URL is not set; using fakeredis in-process (set REDIS_URL to use a real server)")
    import fakeredis

    return fakeredis.FakeRedis()


def stand_in(model: str, messages: list[dict]) -> dict:
    """An offline model: answers after 0.6-1.2 s, like a small hosted model, with a realistic completion."""
    time.sleep(random.uniform(0.6, 1.2))
    text = f"(stand-in answer to: {messages[-1]['content']})"
    prompt = sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)  # roughly 4 characters a token
    completion = len(text) // 4 + 1
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": "fp_stand_in",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": text, "refusal": None}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def pick_model():
    model = os.environ.get("DEMO_MODEL", "gpt-4.1-mini")
    if os.environ.get("OPENAI_API_KEY"):
        from openai import OpenAI

        sdk = OpenAI()
        print(f"Model: OpenAI {model} (OPENAI_API_KEY is set)")
        return model, lambda messages: sdk.chat.completions.create(model=model, messages=messages, temperature=0)
    print(f"Model: an offline stand-in for {model} (OPENAI_API_KEY is not set)")
    return model, lambda messages: stand_in(model, messages)


def main() -> None:
    r = pick_redis()
    model, ask = pick_model()
    cache.PREFIX = f"llm-demo:{uuid.uuid4().hex[:8]}:"  # a fresh namespace, so the figures are this run's
    print()

    messages = [{"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": QUESTIONS[0]}]
    for label in ("first call  (miss, pays the model)", "second call (hit, from Redis)"):
        t = time.perf_counter()
        answer = cache.get_or_set(messages, model, lambda: ask(messages), client=r, params={"temperature": 0})
        print(f"{label}: {(time.perf_counter() - t) * 1000:9.2f} ms")
    print(f"answer: {answer['choices'][0]['message']['content']}")

    print(f"\nA small workload: {len(QUESTIONS)} questions, each asked 10 times in random order ...")
    workload = QUESTIONS * 10
    random.shuffle(workload)
    for question in workload:
        messages = [{"role": "system", "content": "Answer in one short sentence."},
                    {"role": "user", "content": question}]
        cache.get_or_set(messages, model, lambda m=messages: ask(m), client=r, params={"temperature": 0})

    s = cache.stats(client=r)
    print(f"\nhits {s['hits']}, misses {s['misses']}, hit rate {s['hit_rate']:.0%}, tokens saved {s['tokens_saved']}")
    print("money saved at EXAMPLE list prices (USD per 1M tokens; check your provider's current prices):")
    for name, (price_in, price_out) in EXAMPLE_PRICES.items():
        low, high = s["tokens_saved"] * price_in / 1e6, s["tokens_saved"] * price_out / 1e6
        print(f"  {name:13} ${price_in:.2f} in / ${price_out:.2f} out: between ${low:.6f} and ${high:.6f}")
    print("(tokens saved are input and output together, so the saving lies between the two prices)")


if __name__ == "__main__":
    main()
