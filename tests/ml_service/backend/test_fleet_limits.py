"""Rate limits shared by a fleet through Redis (ml_service/backend/security.py, ml_service/shared.py):
two real service processes, one real redis-server; and Redis taken away under load."""

from __future__ import annotations

import asyncio
import itertools
import threading

import httpx
import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from ml_service.backend.app import create_app
from ml_service.backend.errors import RateLimited, Unauthorized
from ml_service.backend.security import Guard
from ml_service.settings import Settings
from ml_service.shared import SharedStore
from tests.helpers import (
    CHECKPOINT,
    free_port,
    metric,
    running_servers,
    scrape,
    wait_for,
    with_settings,
)

TINY = {"text": "a", "max_new_tokens": 1}


def test_without_redis_the_limit_holds_per_replica_and_the_fallback_is_counted(settings):
    """A Redis URL where nothing listens: requests are limited in memory, answered, counted as
    fallbacks, and the service stays ready."""
    s = with_settings(
        settings, rate_limit="3/minute", redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    with TestClient(create_app(s)) as c:
        codes = [c.post("/forward", json=TINY).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        text = c.get("/metrics").text
        assert metric(text, "ml_service_redis_fallbacks_total", use="rate_limit") >= 5
        assert metric(text, "ml_service_redis_up") == 0
        assert c.get("/ready").status_code == 200


def _request(token: str | None, host: str = "10.0.0.7") -> Request:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {"type": "http", "method": "POST", "path": "/forward", "headers": headers}
    return Request({**scope, "query_string": b"", "client": (host, 40000)})


def test_guard_falls_back_to_memory_when_redis_does_not_answer(settings):
    """Guard alone (no app, no model): a SharedStore on a port where nothing listens. The rate
    limit and the failed-authentication limit still hold, in memory, with a Retry-After, and
    every hit that could not reach Redis is counted as a fallback."""
    registry = CollectorRegistry()
    shared = SharedStore(f"redis://127.0.0.1:{free_port()}/0", 50, registry)
    s = with_settings(settings, rate_limit="2/minute", api_keys="k1", auth_failure_limit="2/minute")
    guard = Guard(s, shared)
    assert guard.fleet_limiter is not None

    def fallbacks() -> float:
        return (
            registry.get_sample_value("ml_service_redis_fallbacks_total", {"use": "rate_limit"})
            or 0
        )

    async def scenario() -> None:
        await guard.check(_request("k1"))
        await guard.check(_request("k1"))
        with pytest.raises(RateLimited) as over:
            await guard.check(_request("k1"))
        assert 1 <= over.value.retry_after_s <= 60
        seen = fallbacks()
        assert seen >= 3  # one per hit at least (the auth-failure test counts too)
        with pytest.raises(RateLimited):  # counted per key, not per address
            await guard.check(_request("k1", host="10.0.0.8"))
        # wrong keys from one address: 2 failures, then 429 even with the right key
        for _ in range(2):
            with pytest.raises(Unauthorized):
                await guard.check(_request("nope"))
        with pytest.raises(RateLimited) as blocked:
            await guard.check(_request("k1"))
        assert blocked.value.errors[0]["loc"] == ["authorization"]
        assert 1 <= blocked.value.retry_after_s <= 60
        assert fallbacks() > seen
        await shared.close()

    asyncio.run(scenario())
    assert registry.get_sample_value("ml_service_redis_up") == 0
    assert not shared.healthy


def redis_contents(redis) -> bytes:
    """Every key in Redis and every value under it, whatever its type, as one byte string."""
    seen = []
    for key in redis.scan_iter("*"):
        kind = redis.type(key).decode()
        if kind == "string":
            values = [redis.get(key)]
        elif kind == "list":
            values = redis.lrange(key, 0, -1)
        elif kind == "zset":
            values = [
                m + str(score).encode() for m, score in redis.zrange(key, 0, -1, withscores=True)
            ]
        elif kind == "hash":
            values = [k + v for k, v in redis.hgetall(key).items()]
        elif kind == "set":
            values = list(redis.smembers(key))
        else:
            raise AssertionError(f"a key of a type this test does not read: {key!r} ({kind})")
        seen += [key, *(v or b"" for v in values)]
    return b"\n".join(seen)


@pytest.mark.slow
def test_two_replicas_share_one_clients_limit(redis_server):
    """The same ML_SERVICE_REDIS_SECRET on both replicas: one budget per key and one
    failed-authentication count per address across the fleet, and Redis holds no API key, no
    wrong guess and no client address (its counters are named by HMACs under the secret)."""
    good, other, wrong = "sk-fleet-alpha", "sk-fleet-beta", "sk-wrong-guess"
    env = {
        "ML_SERVICE_REDIS_URL": redis_server.url,
        "ML_SERVICE_REDIS_SECRET": "the-fleets-shared-secret",
        "ML_SERVICE_RATE_LIMIT": "6/minute",
        "ML_SERVICE_API_KEYS": f"{good},{other}",
        "ML_SERVICE_AUTH_FAILURE_LIMIT": "3/hour",
    }
    args = ["--checkpoint", str(CHECKPOINT)]
    with running_servers(2, args, env=env) as (a, b):
        key = {"Authorization": f"Bearer {good}"}
        replicas = itertools.cycle([a.url, b.url])
        codes = [
            httpx.post(f"{next(replicas)}/forward", json=TINY, headers=key, timeout=60).status_code
            for _ in range(8)
        ]
        assert codes == [200] * 6 + [429] * 2, codes  # 6 in all, not 6 per replica
        for url in (a.url, b.url):
            r = httpx.post(f"{url}/forward", json=TINY, headers=key, timeout=60)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # another key has its own budget
        second = httpx.post(
            f"{a.url}/forward", json=TINY, headers={"Authorization": f"Bearer {other}"}
        )
        assert second.status_code == 200
        assert redis_server.client().keys("ml_service:limits*")
        assert metric(scrape(a.url), "ml_service_redis_fallbacks_total") == 0
        # wrong keys spread over both replicas: 3 failures in all, then this address is blocked on
        # both (last: the block refuses even a correct key from this address)
        bad = {"Authorization": f"Bearer {wrong}"}
        codes = [
            httpx.post(f"{next(replicas)}/forward", json=TINY, headers=bad, timeout=60).status_code
            for _ in range(5)
        ]
        assert codes == [401] * 3 + [429] * 2, codes
        for url in (a.url, b.url):
            r = httpx.post(f"{url}/forward", json=TINY, headers=bad, timeout=60)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        for url in (a.url, b.url):
            assert metric(scrape(url), "ml_service_redis_fallbacks_total") == 0
        stored = redis_contents(redis_server.client())
        assert b"auth-failures:" in stored and b"key:" in stored  # the counters are there...
        for secret in (good, other, wrong, "127.0.0.1"):  # ...named by nothing readable
            assert secret.encode() not in stored, secret
        assert "REDIS_SECRET" not in a.log.read_text() + b.log.read_text()  # no warning


def test_counters_are_shared_under_one_secret_and_apart_under_two(settings, redis_server):
    """Guards (one per replica) on one real Redis: the same secret names a client alike, so its
    requests count together; another secret names it otherwise."""
    s = with_settings(settings, rate_limit="2/minute", api_keys="k1", redis_url=redis_server.url)

    async def scenario() -> None:
        stores = [SharedStore(redis_server.url, 500, CollectorRegistry()) for _ in range(3)]
        same = [Guard(with_settings(s, redis_secret="one"), stores[i]) for i in (0, 1)]
        apart = Guard(with_settings(s, redis_secret="two"), stores[2])
        await same[0].check(_request("k1"))
        await same[1].check(_request("k1"))
        with pytest.raises(RateLimited):
            await same[0].check(_request("k1"))
        await apart.check(_request("k1"))  # its own count: another secret, another name
        for store in stores:
            await store.close()

    asyncio.run(scenario())


def test_redis_without_a_secret_is_warned_about_at_start(settings, caplog):
    s = with_settings(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with caplog.at_level("WARNING", logger="ml_service"):
        create_app(s)
    assert "without ML_SERVICE_REDIS_SECRET" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ml_service"):
        create_app(with_settings(s, redis_secret="shared"))
        create_app(with_settings(settings, redis_url=None))
    assert "REDIS_SECRET" not in caplog.text


def test_an_empty_secret_variable_is_no_secret(settings, monkeypatch, caplog):
    """Compose passes ML_SERVICE_REDIS_SECRET through, empty when it is not set: that must warn
    as a missing secret does, not key the counters with the empty string."""
    monkeypatch.setenv("ML_SERVICE_REDIS_SECRET", "")
    assert Settings().redis_secret is None
    s = with_settings(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_secret="")
    with caplog.at_level("WARNING", logger="ml_service"):
        create_app(s)
    assert "without ML_SERVICE_REDIS_SECRET" in caplog.text


@pytest.mark.slow
def test_redis_killed_under_load_fails_no_request_and_sharing_resumes(redis_server):
    """8 clients (one key each, 25 requests each: under their 30/hour even when each replica
    counts them alone) over two replicas; Redis killed after 50 answers. Every request is
    answered, both replicas count rate-limit fallbacks, and once Redis is back a new key is
    limited to 30 in all across both replicas again."""
    keys = [f"k{i}" for i in range(9)] + ["probe"]
    env = {
        "ML_SERVICE_REDIS_URL": redis_server.url,
        "ML_SERVICE_RATE_LIMIT": "30/hour",
        "ML_SERVICE_API_KEYS": ",".join(keys),
    }
    args = ["--checkpoint", str(CHECKPOINT)]
    with running_servers(2, args, env=env) as (a, b):
        statuses: list[int] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(url: str, key: str) -> None:
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
                for _ in range(25):
                    try:
                        code = http.post("/forward", json=TINY).status_code
                    except httpx.HTTPError as e:  # counted as a failure below
                        code = 0
                        with lock:
                            errors.append(repr(e))
                    with lock:
                        statuses.append(code)

        urls = [a.url, b.url] * 4
        threads = [
            threading.Thread(target=client, args=(u, k))
            for u, k in zip(urls, keys[:8], strict=True)
        ]
        for t in threads:
            t.start()
        wait_for(lambda: len(statuses) >= 50, "a quarter of the load is answered")
        redis_server.kill()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert len(statuses) == 200 and set(statuses) == {200}, (errors, sorted(set(statuses)))
        for url in (a.url, b.url):
            text = scrape(url)
            assert metric(text, "ml_service_redis_fallbacks_total", use="rate_limit") > 0, url
            assert metric(text, "ml_service_redis_up") == 0
        logs = a.log.read_text() + b.log.read_text()
        assert "Redis unavailable" in logs
        assert "without ML_SERVICE_REDIS_SECRET" in logs  # this fleet has none: each warned

        redis_server.start()  # the same port, empty: the replicas reconnect on their next call
        probe = {"Authorization": "Bearer probe"}

        def shared_again() -> bool:
            for url in (a.url, b.url):  # answered, or limited once past its own 30: never failed
                r = httpx.post(f"{url}/forward", json=TINY, headers=probe, timeout=60)
                assert r.status_code in (200, 429), r.text
            return all(metric(scrape(u), "ml_service_redis_up") == 1 for u in (a.url, b.url))

        wait_for(shared_again, "both replicas use Redis again")
        # a new client (k8): 30 answers in all across both replicas, then 429 on both
        fresh = {"Authorization": "Bearer k8"}
        replicas = itertools.cycle([a.url, b.url])
        codes = [
            httpx.post(f"{next(replicas)}/forward", json=TINY, headers=fresh, timeout=60)
            for _ in range(32)
        ]
        assert [r.status_code for r in codes] == [200] * 30 + [429] * 2
        assert all(int(r.headers["retry-after"]) >= 1 for r in codes[30:])
        assert redis_server.client().keys("ml_service:limits*")  # counted there again
