"""Rate limits shared by a fleet through Redis (ml_service/backend/security.py, ml_service/shared.py):
two real service processes, one real redis-server; and Redis taken away under load."""

from __future__ import annotations

import itertools
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from ml_service.backend.app import create_app
from tests.conftest import CHECKPOINT, wait_for
from tests.test_ops import with_settings
from tests.test_server import free_port, metric, running_server, scrape

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


@pytest.mark.slow
def test_two_replicas_share_one_clients_limit(redis_server):
    env = {
        "ML_SERVICE_REDIS_URL": redis_server.url,
        "ML_SERVICE_RATE_LIMIT": "6/minute",
        "ML_SERVICE_API_KEYS": "k1,k2",
    }
    args = ["--checkpoint", str(CHECKPOINT)]
    with running_server(args, env=env) as a, running_server(args, env=env) as b:
        key = {"Authorization": "Bearer k1"}
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
        other = httpx.post(f"{a.url}/forward", json=TINY, headers={"Authorization": "Bearer k2"})
        assert other.status_code == 200
        assert redis_server.client().keys("ml_service:limits*")
        assert metric(scrape(a.url), "ml_service_redis_fallbacks_total") == 0


@pytest.mark.slow
def test_redis_killed_under_load_fails_no_request_and_sharing_resumes(redis_server):
    env = {"ML_SERVICE_REDIS_URL": redis_server.url, "ML_SERVICE_RATE_LIMIT": "100000/minute"}
    args = ["--checkpoint", str(CHECKPOINT)]
    with running_server(args, env=env) as a, running_server(args, env=env) as b:
        statuses: list[int] = []
        errors: list[str] = []
        lock = threading.Lock()
        jobs = iter(range(200))

        def client(url: str) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                while True:
                    with lock:
                        if next(jobs, None) is None:
                            return
                    try:
                        code = http.post("/forward", json=TINY).status_code
                    except httpx.HTTPError as e:  # counted as a failure below
                        code, reason = 0, repr(e)
                        errors.append(reason)
                    with lock:
                        statuses.append(code)

        threads = [threading.Thread(target=client, args=(u,)) for u in [a.url, b.url] * 4]
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
            assert "Redis unavailable" in (a.log.read_text() + b.log.read_text())

        redis_server.start()  # the same port: the replicas reconnect on their next call

        def shared_again() -> bool:
            for url in (a.url, b.url):
                assert httpx.post(f"{url}/forward", json=TINY, timeout=60).status_code == 200
            return all(metric(scrape(u), "ml_service_redis_up") == 1 for u in (a.url, b.url))

        wait_for(shared_again, "both replicas use Redis again")
        assert redis_server.client().keys("ml_service:limits*")  # counted there again
