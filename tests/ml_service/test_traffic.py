"""A/B and canary traffic between model versions (ml_service/traffic.py, ml_service/hosting.py):
the split and its sticky assignment on their own, then in the app (pins, the admin routes, the
metrics by version), then in a fleet of two processes sharing one real Redis."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from ml_service.backend.app import create_app
from ml_service.shared import SharedStore
from ml_service.traffic import SPLIT_KEY, BadSplit, SplitSync, TrafficSplit
from tests.helpers import (
    CHECKPOINT,
    HANG_S,
    metric,
    perturbed_copy,
    running_server,
    running_servers,
    scrape,
    wait_for,
    with_settings,
)

KEYS = [f"user-{i}" for i in range(2000)]
ADMIN = {"Authorization": "Bearer adm"}
SHORT = {"text": "Привет", "max_new_tokens": 2, "min_new_tokens": 2, "temperature": 0}


# -- the split on its own -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("v1", "is not version=weight"),
        ("v1=x", "not a number"),
        ("v1=-1", ">= 0"),
        ("v1=nan", ">= 0"),
        ("v1=inf", ">= 0"),
        ("v1=0,v2=0", "at least one version"),
        ("=5", "is not version=weight"),
        ("v1=1e308,v2=1e308", "add up to a finite number"),  # the sum overflowed: shares 0/0
    ],
)
def test_a_bad_split_says_what_is_wrong(text, message):
    with pytest.raises(BadSplit, match=message):
        TrafficSplit.parse(text)


def test_assignment_is_sticky_and_matches_the_weights_over_2000_keys():
    split = TrafficSplit.parse("2026-11-20=90, 2026-11-28=10")
    first = [split.assign(k) for k in KEYS]
    assert first == [TrafficSplit.parse("2026-11-28=10,2026-11-20=90").assign(k) for k in KEYS]
    canary = first.count("2026-11-28") / len(KEYS)
    # binomial standard deviation sqrt(0.1 * 0.9 / 2000) = 0.0067: 4.5 of them either side
    assert abs(canary - 0.10) < 0.03, canary
    three = TrafficSplit.of({"a": 1, "b": 1, "c": 2})
    got = [three.assign(k) for k in KEYS]
    for name, share in (("a", 0.25), ("b", 0.25), ("c", 0.5)):
        assert abs(got.count(name) / len(KEYS) - share) < 0.045, (name, got.count(name))


def test_raising_a_canary_moves_only_clients_towards_it():
    """10% -> 20%: every client on the canary stays there; the new ones come from the old
    version, and nobody moves the other way."""
    before = TrafficSplit.parse("old=90,new=10")
    after = TrafficSplit.parse("old=80,new=20")
    moved = [(before.assign(k), after.assign(k)) for k in KEYS]
    assert ("new", "old") not in moved
    assert 0.05 < moved.count(("old", "new")) / len(KEYS) < 0.15


# -- in the app -----------------------------------------------------------------------------------
def test_a_split_routes_each_client_to_its_version_and_a_pin_wins(settings, models_dir):
    s = with_settings(
        settings,
        models_dir=models_dir,
        model_version="v1",
        traffic="v1=50,v2=50",
        admin_token="adm",
    )
    split = TrafficSplit.parse("v1=50,v2=50")
    with TestClient(create_app(s)) as c:
        meta = c.get("/metadata").json()
        assert meta["loaded_versions"] == ["v1", "v2"] and meta["traffic"] == {"v1": 0.5, "v2": 0.5}
        for user in KEYS[:12]:
            r = c.post("/forward", json=SHORT, headers={"X-User-ID": user})
            want = split.assign("user:" + user)
            assert r.status_code == 200 and r.headers["x-model-version"] == want
            assert r.json()["model"] == f"ru-gpt-tiny-{want}"
        # a pin: the header on /forward, `model` on the OpenAI routes
        pinned = c.post("/forward", json=SHORT, headers={"X-Model-Version": "v1"})
        assert pinned.headers["x-model-version"] == "v1"
        done = c.post("/v1/completions", json={"model": "v2", "prompt": "Привет", "max_tokens": 2})
        assert done.status_code == 200 and done.json()["model"] == "v2", done.text
        assert done.headers["x-model-version"] == "v2"
        ids = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert {"v1", "v2"} <= ids
        unknown = c.post("/forward", json=SHORT, headers={"X-Model-Version": "v9"})
        assert unknown.status_code == 404 and "'v9' is not loaded" in unknown.text
        missing = c.post("/v1/completions", json={"model": "v9", "prompt": "a", "max_tokens": 1})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

        # per-version metrics and counts
        text = c.get("/metrics").text
        for v in ("v1", "v2"):
            assert metric(text, "ml_service_generation_tokens_total", version=v) > 0, text
            assert metric(text, "ml_service_version_requests_total", version=v) > 0
        assert metric(text, "ml_service_traffic_share", version="v2") == 0.5
        counts = c.get("/admin/traffic", headers=ADMIN).json()
        assert counts["split"] == {"v1": 50.0, "v2": 50.0} and counts["loaded"] == ["v1", "v2"]
        # 12 + the pin + /v1 pinned to v2 + /v1 naming v9 (routed, then refused); the unknown
        # X-Model-Version never reached a version
        assert sum(counts["requests"].values()) == 12 + 1 + 1 + 1


def test_the_admin_changes_the_split_and_a_bad_one_keeps_the_old(settings, models_dir):
    s = with_settings(settings, models_dir=models_dir, model_version="v1", admin_token="adm")
    with TestClient(create_app(s)) as c:
        assert c.get("/admin/traffic", headers=ADMIN).json()["split"] is None
        assert c.post("/admin/traffic", json={"split": {"v2": 1}}).status_code == 401
        r = c.post("/admin/traffic", json={"split": "v1=0,v2=100"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["split"] == {"v2": 100.0} and r.json()["shared"] is False
        for user in KEYS[:5]:
            r = c.post("/forward", json=SHORT, headers={"X-User-ID": user})
            assert r.headers["x-model-version"] == "v2"
        for bad, says in (
            ({"split": {"v2": 50, "v3": 50}}, "'v3' failed to load"),
            ({"split": {"v9": 1}}, "unknown version 'v9'"),
            ({"split": {"v1": -1}}, ">= 0"),
            ({"split": "v1"}, "is not version=weight"),
            ({"split": 7}, "split"),
            ({"split": {"v1": 1e308, "v2": 1e308}}, "add up to a finite number"),
        ):
            r = c.post("/admin/traffic", json=bad, headers=ADMIN)
            assert r.status_code == 400 and says in r.text, r.text
            assert str(models_dir) not in r.text
        assert r.json()["errors"][0]["loc"] == ["split"]  # the overflowing one names `split`
        assert c.get("/admin/traffic", headers=ADMIN).json()["split"] == {"v2": 100.0}
        # back to the default version alone: v2 leaves memory
        r = c.post("/admin/traffic", json={"split": None}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["loaded"] == ["v1"]
        assert c.post("/forward", json=SHORT).headers["x-model-version"] == "v1"


def test_a_shadow_version_gets_a_copy_and_its_answers_are_discarded(settings, models_dir):
    s = with_settings(settings, models_dir=models_dir, model_version="v1", shadow_version="v2")
    with TestClient(create_app(s)) as c:
        assert c.get("/metadata").json()["shadow_version"] == "v2"
        shadow = c.app.state.deps.host.shadow
        threads, preprocess = [], shadow.service.preprocess

        def recorded(request):  # the copy is prepared off the event loop, as the answer is
            threads.append(threading.current_thread().name)
            return preprocess(request)

        shadow.service.preprocess = recorded
        for _ in range(3):
            r = c.post("/forward", json=SHORT)
            assert r.headers["x-model-version"] == "v1" and r.json()["model"] == "ru-gpt-tiny-v1"
        batch = {"texts": ["а", "б"], "max_new_tokens": 2, "min_new_tokens": 2}
        r = c.post("/forward_batch", json=batch)
        assert r.status_code == 200 and r.headers["x-model-version"] == "v1"

        def shadow_tokens() -> float:
            text = c.get("/metrics").text
            return metric(text, "ml_service_generation_tokens_total", version="v2")

        # 3 + 2 copies of 2 tokens each, generated beside the answers (never awaited by them)
        wait_for(lambda: shadow_tokens() == 10, "the shadow version generated its copies")
        requests = metric(c.get("/metrics").text, "ml_service_version_requests_total", version="v2")
        assert requests == 0  # nobody was served by it
        assert len(threads) == 5 and all(t.startswith("prepare") for t in threads), threads


def test_a_reload_unloads_the_version_nobody_routes_to(settings, models_dir):
    s = with_settings(settings, models_dir=models_dir, model_version="v1", admin_token="adm")
    with TestClient(create_app(s)) as c:
        host = c.app.state.deps.host
        old = host.current
        assert c.post("/admin/reload", json={"version": "v2"}, headers=ADMIN).status_code == 200
        assert c.get("/metadata").json()["loaded_versions"] == ["v2"]
        wait_for(lambda: old.engine.stopped, "v1 engine stopped")
        # in a split, the old default stays: clients are still routed to it
        c.post("/admin/traffic", json={"split": {"v1": 1, "v2": 1}}, headers=ADMIN)
        assert c.post("/admin/reload", json={"version": "v1"}, headers=ADMIN).status_code == 200
        assert c.get("/metadata").json()["loaded_versions"] == ["v1", "v2"]
        # the same version read again: the copy it replaces is stopped
        again = host.loaded["v1"]
        assert c.post("/admin/reload", json={}, headers=ADMIN).status_code == 200
        assert host.loaded["v1"] is not again
        wait_for(lambda: again.engine.stopped, "the replaced copy stopped")


def test_a_split_needs_versions(settings):
    s = with_settings(settings, admin_token="adm")
    with TestClient(create_app(s)) as c:
        r = c.post("/admin/traffic", json={"split": {"v1": 1}}, headers=ADMIN)
        assert r.status_code == 400 and "ML_SERVICE_MODELS_DIR" in r.text


def test_a_bad_traffic_setting_is_refused_at_start():
    from ml_service.settings import Settings

    with pytest.raises(ValueError, match="is not version=weight"):
        Settings(traffic="v1")
    with pytest.raises(ValueError, match="add up to a finite number"):
        Settings(traffic="v1=1e308,v2=1e308")  # ML_SERVICE_TRAFFIC is parsed alike


# -- a fleet: two processes, one Redis ------------------------------------------------------------
@pytest.mark.slow
def test_two_replicas_assign_alike_and_share_a_split_changed_on_one(redis_server, models_dir):
    env = {
        "ML_SERVICE_MODELS_DIR": str(models_dir),
        "ML_SERVICE_MODEL_VERSION": "v1",
        "ML_SERVICE_TRAFFIC": "v1=70,v2=30",
        "ML_SERVICE_ADMIN_TOKEN": "adm",
        "ML_SERVICE_REDIS_URL": redis_server.url,
    }
    with running_servers(2, [], env=env) as (a, b):
        # every route that reads the model routes by client: /metadata is the cheapest
        versions = {}
        for url in (a.url, b.url):
            with httpx.Client(base_url=url, timeout=60) as http:
                versions[url] = [
                    http.get("/metadata", headers={"X-User-ID": u}).headers["x-model-version"]
                    for u in KEYS
                ]
        assert versions[a.url] == versions[b.url]
        share = versions[a.url].count("v2") / len(KEYS)
        assert abs(share - 0.30) < 0.05, share  # 4.9 binomial standard deviations (0.0102)
        for u in KEYS[:8]:  # and generation follows the same assignment
            r = httpx.post(f"{b.url}/forward", json=SHORT, headers={"X-User-ID": u}, timeout=60)
            assert r.headers["x-model-version"] == versions[a.url][KEYS.index(u)]

        r = httpx.post(
            f"{a.url}/admin/traffic", json={"split": {"v2": 1}}, headers=ADMIN, timeout=60
        )
        assert r.status_code == 200 and r.json()["shared"] is True, r.text

        def b_follows() -> bool:
            got = httpx.get(f"{b.url}/admin/traffic", headers=ADMIN, timeout=10).json()
            return got["split"] == {"v2": 1.0}

        wait_for(b_follows, "replica B applies the split published by replica A")
        for u in KEYS[:5]:
            r = httpx.post(f"{b.url}/forward", json=SHORT, headers={"X-User-ID": u}, timeout=60)
            assert r.headers["x-model-version"] == "v2"
        assert metric(scrape(b.url), "ml_service_traffic_share", version="v2") == 1.0


@pytest.mark.slow
def test_a_split_lost_by_redis_is_written_back_and_a_joining_replica_gets_it(
    redis_server, models_dir
):
    """Redis flushed, then restarted empty: the replica that holds the admin's split writes it
    back, and a replica that starts afterwards (with no split of its own) applies it."""
    env = {
        "ML_SERVICE_MODELS_DIR": str(models_dir),
        "ML_SERVICE_MODEL_VERSION": "v1",
        "ML_SERVICE_ADMIN_TOKEN": "adm",
        "ML_SERVICE_REDIS_URL": redis_server.url,
        "ML_SERVICE_REDIS_SECRET": "fleet-secret",
    }

    def split_of(url: str):
        return httpx.get(f"{url}/admin/traffic", headers=ADMIN, timeout=10).json()["split"]

    def published():
        raw = redis_server.client().get(SPLIT_KEY)
        return raw and json.loads(raw)["split"]

    with running_server([], env=env) as a:
        r = httpx.post(
            f"{a.url}/admin/traffic", json={"split": {"v1": 1, "v2": 3}}, headers=ADMIN, timeout=60
        )
        assert r.status_code == 200 and r.json()["shared"] is True, r.text
        redis_server.client().flushall()
        assert published() is None
        wait_for(lambda: published() == "v1=1,v2=3", "the split is written back after FLUSHALL")
        redis_server.kill()
        redis_server.start()  # the same port, empty
        wait_for(lambda: published() == "v1=1,v2=3", "the split is written back after a restart")
        with running_server([], env=env) as joining:  # with no split of its own
            wait_for(lambda: split_of(joining.url) == {"v1": 1.0, "v2": 3.0}, "it applies it")
        assert split_of(a.url) == {"v1": 1.0, "v2": 3.0}


async def _published(store: SharedStore) -> str | None:
    raw = await store.run("traffic", lambda: store.client.get(SPLIT_KEY), None)
    return raw and json.loads(raw)["split"]


class SplitHolder:
    """What SplitSync reads and changes on a model host: the split in force (no models here: the
    rule under test is which split wins, not how versions load)."""

    def __init__(self, split: str | None = None):
        self.split = TrafficSplit.parse(split) if split else None

    async def set_traffic(self, split: TrafficSplit) -> None:
        self.split = split

    async def clear_traffic(self) -> None:
        self.split = None


def test_the_newest_split_wins_and_a_write_back_never_undoes_a_newer_one(redis_server):
    """Two replicas' SplitSync on one real Redis. The rule (SplitSync's docstring): the newest
    split an admin set wins, whichever replica polls first; a split from the settings never
    reaches Redis; a split set while Redis was away reaches it when Redis answers again."""

    async def scenario() -> None:
        stores = [SharedStore(redis_server.url, 500, CollectorRegistry()) for _ in range(2)]
        redis = stores[0].client
        one, two = SplitSync(stores[0]), SplitSync(stores[1])
        old, new = SplitHolder("v1=1"), SplitHolder("v1=1")  # both from the settings
        await one.poll(old)
        await two.poll(new)
        assert await redis.get(SPLIT_KEY) is None  # a settings split is nobody's to publish

        old.split = TrafficSplit.parse("v1=1,v2=1")
        assert await one.publish(old.split)
        await two.poll(new)
        assert new.split.text() == "v1=1,v2=1"  # applied on the other replica
        new.split = TrafficSplit.parse("v2=1")
        assert await two.publish(new.split)  # a later admin change, on replica two

        # Redis restarts empty before replica one saw that: whoever writes back first, the
        # newer split ends up in Redis, and replica one then applies it
        older_at = one.at
        for order in ((one, old), (two, new)), ((two, new), (one, old)):
            await redis.flushall()
            for sync, holder in order:
                await sync.poll(holder)
            assert json.loads(await redis.get(SPLIT_KEY))["split"] == "v2=1"
            await one.poll(old)
            assert old.split.text() == "v2=1"
            old.split, one.at = TrafficSplit.parse("v1=1,v2=1"), older_at  # as it was

        # an admin's change while Redis is away: kept here, and shared once Redis answers
        redis_server.kill()
        old.split = TrafficSplit.parse("v1=3,v2=1")
        assert not await one.publish(old.split)
        redis_server.start()  # empty; replica two, polling first, holds the older split
        deadline = time.monotonic() + HANG_S
        while await _published(stores[0]) != "v1=3,v2=1":  # (until both have reconnected)
            assert time.monotonic() < deadline, "the split set while Redis was away is shared"
            await two.poll(new)
            await one.poll(old)
        await two.poll(new)
        assert new.split.text() == "v1=3,v2=1"
        for store in stores:
            await store.close()

    asyncio.run(scenario())


def test_a_version_switch_under_load_fails_nothing_and_never_crosses_caches(settings, tmp_path):
    """v1 and v2 with different weights, the cache on: greedy requests from 4 threads while the
    default switches v1 -> v2 -> v1. Every answer is 200 and is exactly what the version named in
    its X-Model-Version header answers alone (a cached answer of the other version would not be)."""
    root = tmp_path / "versions"
    shutil.copytree(CHECKPOINT, root / "v1")
    shutil.move(perturbed_copy(tmp_path, "v2"), root / "v2")
    s = with_settings(
        settings, models_dir=root, model_version="v1", admin_token="adm", cache_ttl_s=600
    )
    prompts = ["Москва — столица", "Привет, мир!", "Он открыл дверь и"]
    body = {"max_new_tokens": 8, "min_new_tokens": 8, "temperature": 0}
    with TestClient(create_app(s)) as c:
        c.post("/admin/traffic", json={"split": {"v1": 1, "v2": 0.0001}}, headers=ADMIN)
        alone = {
            (v, p): c.post(
                "/forward",
                json={**body, "text": p, "cache": False},
                headers={"X-Model-Version": v},
            ).json()["text"]
            for v in ("v1", "v2")
            for p in prompts
        }
        assert any(alone[("v1", p)] != alone[("v2", p)] for p in prompts)  # they do differ
        c.post("/admin/traffic", json={"split": None}, headers=ADMIN)
        answers, stop = [], threading.Event()

        def load(i: int) -> None:
            while not stop.is_set():
                p = prompts[i % len(prompts)]
                r = c.post("/forward", json={**body, "text": p})
                answers.append((r.status_code, r.headers.get("x-model-version"), p, r.json()))
                i += 1

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            for version in ("v2", "v1", "v2"):
                n = len(answers)
                wait_for(lambda n=n: len(answers) >= n + 6, "requests are answered meanwhile")
                r = c.post("/admin/reload", json={"version": version}, headers=ADMIN)
                assert r.status_code == 200, r.text
            n = len(answers)
            wait_for(lambda: len(answers) >= n + 6, "requests answered after the last switch")
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert all(code == 200 for code, *_ in answers), answers
        assert {v for _, v, _, _ in answers} == {"v1", "v2"}
        for _, version, p, out in answers:
            assert out["text"] == alone[(version, p)], (version, p)
