"""A/B and canary traffic between model versions: a weighted split, and a sticky assignment.

`TrafficSplit.parse("2026-11-20=90,2026-11-28=10")` holds the weights. `assign(client)` hashes the
client's key (SHA-256, no secret, no state) to a point in [0, 1) and walks the versions in name
order, each owning a share of [0, 1) equal to its weight. So every replica that holds the same
split sends a client to the same version, a client stays on its version while the split is
unchanged, and moving weight from one version to another moves only the clients in the share that
changed hands (raising a canary from 10% to 20% keeps the first 10% where they were).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
from dataclasses import dataclass

from fastapi import Request

log = logging.getLogger("ml_service")


class BadSplit(ValueError):
    """A split that cannot be used: the message says why (it reaches the admin's answer)."""


@dataclass(frozen=True)
class TrafficSplit:
    weights: tuple[tuple[str, float], ...]  # (version, weight) sorted by version, weights > 0

    @classmethod
    def parse(cls, text: str) -> TrafficSplit:
        """`name=weight,name=weight`; weights are non-negative numbers (percentages or any
        other scale: only their ratios count)."""
        pairs = {}
        for part in text.split(","):
            if not part.strip():
                continue
            name, sep, weight = part.partition("=")
            if not sep or not name.strip():
                raise BadSplit(f"{part.strip()!r} is not version=weight")
            try:
                pairs[name.strip()] = float(weight)
            except ValueError:
                raise BadSplit(f"the weight of {name.strip()!r} is not a number") from None
        return cls.of(pairs)

    @classmethod
    def of(cls, weights: dict[str, float]) -> TrafficSplit:
        for name, w in weights.items():
            if not (w >= 0 and w != float("inf")):  # also refuses NaN
                raise BadSplit(f"the weight of {name!r} must be a finite number >= 0")
        kept = tuple(sorted((n, float(w)) for n, w in weights.items() if w > 0))
        if not kept:
            raise BadSplit("a split needs at least one version with a weight above 0")
        if not math.isfinite(sum(w for _, w in kept)):  # 1e308 + 1e308: the shares were 0/0
            raise BadSplit("the weights must add up to a finite number; scale them down")
        return cls(kept)

    @property
    def versions(self) -> list[str]:
        return [name for name, _ in self.weights]

    def shares(self) -> dict[str, float]:
        """Each version's share of the traffic, in [0, 1]."""
        total = sum(w for _, w in self.weights)
        return {name: w / total for name, w in self.weights}

    def assign(self, client: str) -> str:
        point = _unit(client)
        edge = 0.0
        for name, share in self.shares().items():
            edge += share
            if point < edge:
                return name
        return self.weights[-1][0]  # rounding at the very top

    def text(self) -> str:
        return ",".join(f"{n}={w:g}" for n, w in self.weights)


def _unit(client: str) -> float:
    digest = hashlib.sha256(client.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def client_key(request: Request, api_key: str | None) -> str:
    """Whom a request comes from, for sticky assignment: its API key (as a keyed hash, never the
    key itself), else its `X-User-ID` header, else its address."""
    if api_key:
        return "key:" + hmac.new(b"traffic", api_key.encode(), "sha256").hexdigest()
    if user := request.headers.get("x-user-id", "").strip():
        return "user:" + user[:256]
    return "addr:" + (request.client.host if request.client else "unknown")


SPLIT_KEY = "ml_service:traffic"


class SplitSync:
    """The split shared by the fleet: `POST /admin/traffic` on any replica publishes it to Redis,
    and every replica polls it there (`interval_s`) and applies a change (loading the versions it
    names first). Without Redis, or while Redis is down, each replica keeps the split it has."""

    def __init__(self, shared, interval_s: float = 1.0):
        self.shared = shared
        self.interval_s = interval_s
        self.failed_text: str | None = None  # a published split this replica could not apply

    async def publish(self, split: TrafficSplit | None) -> bool:
        """Whether the fleet got it (False without Redis or when Redis failed)."""
        if not self.shared.enabled:
            return False
        value = json.dumps({"split": split.text() if split else None})
        ok = await self.shared.run(
            "traffic", lambda: self.shared.client.set(SPLIT_KEY, value), None
        )
        return bool(ok)

    async def poll(self, host) -> None:
        """Apply the published split once, if it differs from the one in force."""
        raw = await self.shared.run("traffic", lambda: self.shared.client.get(SPLIT_KEY), None)
        if raw is None:
            return
        text = json.loads(raw).get("split")
        if text == (host.split.text() if host.split else None) or text == self.failed_text:
            return
        try:
            if text is None:
                await host.clear_traffic()
            else:
                await host.set_traffic(TrafficSplit.parse(text))
            self.failed_text = None
        except Exception as e:  # unknown here, or failed to load: keep the split in force
            self.failed_text = text
            log.error("the fleet's traffic split %r was not applied here: %s", text, e)

    async def run(self, host) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if host.current is not None:
                await self.poll(host)
