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
import time
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
# store ARGV[1] (a split's JSON) unless Redis holds a split set at or after ARGV[2]: a replica that
# writes back the split it holds never replaces a newer one (or an equal one: the first stays)
PUT_IF_NEWER = """
local held = redis.call('GET', KEYS[1])
if held then
  local ok, value = pcall(cjson.decode, held)
  if ok and type(value) == 'table' and tonumber(value['at']) ~= nil
     and tonumber(value['at']) >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


class SplitSync:
    """The split shared by the fleet: `POST /admin/traffic` on any replica publishes it to Redis,
    and every replica polls it there (`interval_s`) and applies a change (loading the versions it
    names first). Without Redis, or while Redis is down, each replica keeps the split it has.

    Each published split carries `at`, when an admin set it (the wall clock of the replica that
    took the POST, and always later than the split that replica held). The rule, on every poll:
    the newest split wins. Redis holds a newer one: apply it. Redis holds an older one, or none
    (it restarted empty, or was flushed), while this replica holds a split an admin set: write it
    back, unless another replica wrote a newer one first (PUT_IF_NEWER decides in Redis, so two
    replicas never undo each other). So a split set while Redis was away reaches the fleet when
    Redis returns, and a replica that joins after Redis lost its data gets the split the others
    hold. A split from ML_SERVICE_TRAFFIC is no admin's (`at` 0): it is never published, and any
    published split wins over it."""

    def __init__(self, shared, interval_s: float = 1.0):
        self.shared = shared
        self.interval_s = interval_s
        self.at = 0.0  # when the split this replica holds was set by an admin; 0: none was
        self.failed_text: str | None = None  # a published split this replica could not apply

    async def publish(self, split: TrafficSplit | None) -> bool:
        """An admin set `split` here: share it. Whether the fleet got it (False without Redis or
        when Redis failed: then the next poll that reaches Redis writes it back)."""
        self.at = max(time.time(), self.at + 1e-3)
        if not self.shared.enabled:
            return False
        value = _value(split.text() if split else None, self.at)
        ok = await self.shared.run(
            "traffic", lambda: self.shared.client.set(SPLIT_KEY, value), None
        )
        return bool(ok)

    async def poll(self, host) -> None:
        """Apply the published split if it is newer than the one in force, or write the one in
        force back if it is newer than what Redis holds (see the class's rule)."""
        missing = object()
        raw = await self.shared.run("traffic", lambda: self.shared.client.get(SPLIT_KEY), missing)
        if raw is missing:  # Redis away: keep the split in force
            return
        held = host.split.text() if host.split else None
        if raw is None:  # Redis lost it (a restart, a flush), or nobody published yet
            if self.at > 0:
                await self._write_back(held)
            return
        value = json.loads(raw)
        published, at = value.get("split"), float(value.get("at") or 0.0)
        if at < self.at:
            await self._write_back(held)
        elif published == held:
            self.at = at
        elif published != self.failed_text:
            await self._apply(host, published, at)

    async def _write_back(self, held: str | None) -> None:
        value, at = _value(held, self.at), self.at

        def put():
            return self.shared.client.eval(PUT_IF_NEWER, 1, SPLIT_KEY, value, repr(at))

        if await self.shared.run("traffic", put, None):
            log.info("traffic split %r written back to Redis (it held an older one, or none)", held)

    async def _apply(self, host, text: str | None, at: float) -> None:
        try:
            if text is None:
                await host.clear_traffic()
            else:
                await host.set_traffic(TrafficSplit.parse(text))
            self.failed_text = None
            self.at = at
        except Exception as e:  # unknown here, or failed to load: keep the split in force
            self.failed_text = text
            log.error("the fleet's traffic split %r was not applied here: %s", text, e)

    async def run(self, host) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if host.current is not None:
                await self.poll(host)


def _value(split: str | None, at: float) -> str:
    return json.dumps({"split": split, "at": at})
