"""The response cache (ml_service/cache.py): what is cached and what is not, the opt-outs, every
route, TTL and LRU in memory, and a fleet sharing it through a real Redis."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from ml_service.backend.app import create_app
from ml_service.backend.schemas import ForwardRequest
from ml_service.cache import ResponseCache
from ml_service.services.text_generation import TextGenerationService
from ml_service.shared import SharedStore
from tests.helpers import (
    CHECKPOINT,
    metric,
    perturbed_copy,
    running_server,
    running_servers,
    scrape,
    with_settings,
)

GREEDY = {"text": "Москва — столица", "max_new_tokens": 6, "min_new_tokens": 6, "temperature": 0}
SEEDED = {"text": "Привет", "max_new_tokens": 6, "min_new_tokens": 6, "seed": 7}
NO_STORE = {"Cache-Control": "no-store"}
SAMPLED = {"text": "Привет", "max_new_tokens": 6, "temperature": 0.9}


@pytest.fixture
def client(settings):
    with TestClient(create_app(with_settings(settings, cache_ttl_s=600))) as c:
        yield c


def tokens_generated(c) -> float:
    return metric(c.get("/metrics").text, "ml_service_generation_tokens_total")


def test_a_repeated_greedy_or_seeded_request_is_a_hit_that_skips_the_model(client):
    for body in (GREEDY, SEEDED):
        first = client.post("/forward", json=body)
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        before = tokens_generated(client)
        again = client.post("/forward", json=body)
        assert again.headers["x-cache"] == "hit"
        assert again.content == first.content  # byte-identical
        assert tokens_generated(client) == before  # the model did nothing
    text = client.get("/metrics").text
    assert metric(text, "ml_service_cache_requests_total", result="hit") == 2
    assert metric(text, "ml_service_cache_requests_total", result="miss") == 2


def test_unseeded_sampling_and_opt_outs_bypass_the_cache(client):
    for _ in range(2):
        assert client.post("/forward", json=SAMPLED).headers["x-cache"] == "bypass"
    client.post("/forward", json=GREEDY)  # stored
    assert client.post("/forward", json={**GREEDY, "cache": False}).headers["x-cache"] == "bypass"
    for directive in ("no-cache", "no-store", "max-age=0, no-cache"):
        r = client.post("/forward", json=GREEDY, headers={"Cache-Control": directive})
        assert r.headers["x-cache"] == "bypass", directive
    assert client.post("/forward", json=GREEDY).headers["x-cache"] == "hit"
    # no-store stores nothing; no-cache stores the fresh answer
    other = {**GREEDY, "text": "Он открыл дверь и"}
    client.post("/forward", json=other, headers={"Cache-Control": "no-store"})
    assert client.post("/forward", json=other).headers["x-cache"] == "miss"
    third = {**GREEDY, "text": "Старый учитель"}
    client.post("/forward", json=third, headers={"Cache-Control": "no-cache"})
    assert client.post("/forward", json=third).headers["x-cache"] == "hit"
    # every parameter is part of the key
    assert (
        client.post("/forward", json={**GREEDY, "max_new_tokens": 7}).headers["x-cache"] == "miss"
    )


def test_a_batch_is_cached_per_item(client):
    client.post("/forward", json=GREEDY)
    body = {
        "texts": [GREEDY["text"], "Новый текст"],
        **{k: GREEDY[k] for k in GREEDY if k != "text"},
    }
    first = client.post("/forward_batch", json=body)
    assert first.headers["x-cache"] == "miss"  # one hit, one miss
    alone = client.post("/forward", json=GREEDY).json()
    assert first.json()["results"][0]["text"] == alone["text"]
    before = tokens_generated(client)
    again = client.post("/forward_batch", json=body)
    assert again.headers["x-cache"] == "hit" and again.content == first.content
    assert tokens_generated(client) == before
    r = client.post("/forward_batch", json={**body, "cache": False})
    assert r.headers["x-cache"] == "bypass"
    sampled = {**body, "temperature": 0.9}  # unseeded: every item bypasses
    assert client.post("/forward_batch", json=sampled).headers["x-cache"] == "bypass"


def test_a_streamed_hit_streams_the_cached_text(client):
    plain = client.post("/forward", json=GREEDY).json()
    with client.stream("POST", "/forward", json={**GREEDY, "stream": True}) as r:
        assert r.headers["x-cache"] == "hit"
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text"] for e in events[:-1]) == plain["text"]
    assert events[-1] == plain
    # and a streamed miss is stored for the next one
    body = {**GREEDY, "text": "Вчера вечером", "stream": True}
    with client.stream("POST", "/forward", json=body) as r:
        assert r.headers["x-cache"] == "miss"
        streamed = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    stored = client.post("/forward", json={**body, "stream": False})
    assert stored.headers["x-cache"] == "hit" and stored.json() == streamed[-1]


def test_the_openai_routes_are_cached_too(client):
    body = {"prompt": "Москва — столица", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    first = client.post("/v1/completions", json=body)
    again = client.post("/v1/completions", json=body)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    strip = lambda r: {k: v for k, v in r.json().items() if k not in ("id", "created")}  # noqa: E731
    assert strip(first) == strip(again)  # logprobs included
    assert "logprobs" in first.text and first.json()["choices"][0]["logprobs"]
    other = client.post("/v1/completions", json={**body, "logprobs": 1})  # another answer
    assert other.headers["x-cache"] == "miss"
    for opt_out in ({"json": {**body, "cache": False}}, {"json": body, "headers": NO_STORE}):
        assert client.post("/v1/completions", **opt_out).headers["x-cache"] == "bypass"
    chat = {"messages": [{"role": "user", "content": "Привет"}], "max_tokens": 4, "seed": 3}
    first = client.post("/v1/chat/completions", json=chat)
    with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
        assert r.headers["x-cache"] == "hit"
        chunks = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    pieces = [json.loads(c)["choices"][0]["delta"].get("content", "") for c in chunks[:-1]]
    assert "".join(pieces) == first.json()["choices"][0]["message"]["content"]
    n = client.post("/v1/completions", json={**body, "n": 2, "temperature": 0.7, "seed": None})
    assert n.headers["x-cache"] == "bypass"


def test_memory_cache_expires_and_keeps_the_most_recently_used(settings):
    now = [0.0]
    s = with_settings(settings, cache_ttl_s=10, cache_max_entries=2)
    cache = ResponseCache(
        s, SharedStore(None, 50, CollectorRegistry()), CollectorRegistry(), lambda: now[0]
    )

    async def run():
        await cache.put("a", {"v": 1})
        await cache.put("b", {"v": 2})
        got = await cache.get("a")  # a is now the most recently used
        assert got == {"v": 1}
        got["v"] = 9  # the caller's copy: the entry stays as stored
        await cache.put("c", {"v": 3})  # over the bound: b goes
        assert (await cache.get("b"), await cache.get("a"), await cache.get("c")) == (
            None,
            {"v": 1},
            {"v": 3},
        )
        now[0] = 9.999
        assert await cache.get("a") == {"v": 1}
        now[0] = 10.0  # the TTL has passed
        assert await cache.get("a") is None and await cache.get("c") is None

    asyncio.run(run())


def test_the_key_names_the_content_the_numerics_the_prompt_and_every_parameter(settings):
    f32 = TextGenerationService(with_settings(settings, dtype="float32"))
    bf16 = TextGenerationService(with_settings(settings, dtype="bfloat16"))
    f32.load()
    bf16.load()

    def key(service, **changes):
        return service.cache_key(service.preprocess(ForwardRequest(**{**GREEDY, **changes})))

    assert key(f32) == key(f32) and len(key(f32)) == 64
    assert key(bf16) != key(f32)  # the same files, other rounding: another answer
    for change in (
        {"text": GREEDY["text"] + " "},
        {"max_new_tokens": 7},
        {"repetition_penalty": 1.2},
        {"stop": ["."]},
        {"top_k": 3},
        {"seed": 1},
    ):
        assert key(f32, **change) not in (None, key(f32)), change
    assert key(f32, temperature=0.9) is None  # unseeded sampling: never cached
    assert key(f32, temperature=0.9, seed=1) != key(f32, temperature=0.9, seed=2)


def test_a_zero_ttl_turns_the_cache_off(settings):
    with TestClient(create_app(with_settings(settings, cache_ttl_s=0))) as c:
        for _ in range(2):
            assert c.post("/forward", json=GREEDY).headers["x-cache"] == "bypass"


# -- the fleet: one Redis -------------------------------------------------------------------------
@pytest.mark.slow
def test_two_replicas_share_the_cache_and_a_changed_checkpoint_misses(redis_server, tmp_path):
    env = {"ML_SERVICE_REDIS_URL": redis_server.url}
    args = ["--checkpoint", str(CHECKPOINT)]
    with running_servers(2, args, env=env) as (a, b):
        first = httpx.post(f"{a.url}/forward", json=GREEDY, timeout=60)
        second = httpx.post(f"{b.url}/forward", json=GREEDY, timeout=60)
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        assert second.content == first.content
        assert metric(scrape(b.url), "ml_service_generation_tokens_total") == 0  # b never ran it
        assert redis_server.client().keys("ml_service:cache:*")
    # the same name, other weights: never the old entry
    other = perturbed_copy(tmp_path, CHECKPOINT.name)
    with running_server(["--checkpoint", str(other)], env=env) as c:
        r = httpx.post(f"{c.url}/forward", json=GREEDY, timeout=60)
        assert r.headers["x-cache"] == "miss"
        meta = httpx.get(f"{c.url}/metadata").json()
        assert meta["checkpoint"]["name"] == CHECKPOINT.name


@pytest.mark.slow
def test_without_redis_the_cache_is_skipped_and_nothing_fails(redis_server):
    env = {"ML_SERVICE_REDIS_URL": redis_server.url}
    with running_server(["--checkpoint", str(CHECKPOINT)], env=env) as a:
        assert httpx.post(f"{a.url}/forward", json=GREEDY, timeout=60).headers["x-cache"] == "miss"
        redis_server.kill()
        for _ in range(3):
            r = httpx.post(f"{a.url}/forward", json=GREEDY, timeout=60)
            assert r.status_code == 200 and r.headers["x-cache"] == "miss"
        assert metric(scrape(a.url), "ml_service_redis_fallbacks_total", use="cache") >= 6
        assert httpx.get(f"{a.url}/ready").status_code == 200
