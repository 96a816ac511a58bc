"""Automatic prefix caching: the keys and values of prompt prefixes, kept after their requests end.

Prompts often begin alike: a chat's system prompt, a few-shot template, the earlier turns of a
conversation. The cache keeps the KV of such beginnings in blocks of `BLOCK` tokens. A block is
named by a hash of its tokens and of the name of the block before it (vLLM's automatic prefix
caching works the same way), so a name stands for the whole prefix up to the block's end. A new
row looks up its prompt's blocks one after another and stops at the first one missing. The blocks
found are copied into its KV-cache slot, and only the rest of the prompt is run
(`GPT2SlotDecoder.prefill(..., cached=...)`).

Blocks are copied into a row, never shared with it, so a block in use cannot be changed or freed
under a running row; "in use" lasts only for the copy, which runs on the decoding thread like every
other change to the cache. Eviction is least-recently-used within a memory budget. A lookup touches
a prefix's blocks from its end back to its start, so a prefix's first blocks are always the most
recently used: eviction takes the ends of prefixes first and never strands a block behind a
missing parent.

What a block's KV depends on is part of its name or of the cache's own life:
- the tokens of the whole prefix (the hash chain);
- the model, its weights, dtype and quantization: a cache belongs to one engine's `DecodeBatch`.
  A reload or a new version builds a new engine, and with it an empty cache;
- `namespace`: anything else a row's KV depends on (an adapter, later), the chain's first link.

Only whole blocks are cached, and at least one token of a prompt is always run, since the row
needs the logits of its last prompt token.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK = 16  # tokens per cached block


@dataclass
class PrefixStats:
    """The cache's state (the engine reports it as metrics)."""

    evictions: int = 0  # blocks dropped to make room, since the cache was made
    blocks: int = 0  # blocks held now


def block_names(ids: Sequence[int], namespace: str = "") -> list[bytes]:
    """The names of the whole blocks of `ids`: each hashes its tokens and the name before it."""
    names = []
    parent = hashlib.blake2b(namespace.encode(), digest_size=16).digest()
    for start in range(0, len(ids) - BLOCK + 1, BLOCK):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(b"".join(int(t).to_bytes(4, "little") for t in ids[start : start + BLOCK]))
        parent = h.digest()
        names.append(parent)
    return names


class PrefixCache:
    """Cached KV blocks of a model with `layers` layers, `heads` heads of `head_dim`, within
    `budget_bytes` (room for `capacity` blocks; 0 blocks: the cache is off)."""

    def __init__(
        self,
        layers: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        budget_bytes: int,
    ):
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.dtype, self.device = dtype, device
        element = torch.empty((), dtype=dtype).element_size()
        self.block_bytes = 2 * layers * heads * BLOCK * head_dim * element
        self.capacity = max(0, int(budget_bytes) // self.block_bytes)
        self._k: list[torch.Tensor] = []  # per layer: (capacity, heads, BLOCK, head_dim)
        self._v: list[torch.Tensor] = []
        self._where: OrderedDict[bytes, int] = OrderedDict()  # name -> place, oldest first
        self._free: list[int] = []
        self.stats = PrefixStats()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def _allocate(self) -> None:
        # torch.empty reserves address space; pages are committed as blocks are written
        shape = (self.capacity, self.heads, BLOCK, self.head_dim)
        make = lambda: torch.empty(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        self._k = [make() for _ in range(self.layers)]
        self._v = [make() for _ in range(self.layers)]
        self._free = list(range(self.capacity - 1, -1, -1))

    def leaders(
        self, prompts: Sequence[Sequence[int]], namespaces: Sequence[str] | None = None
    ) -> list[int]:
        """Of prompts arriving together, the first of each group whose first block is the same and
        not cached (by place): running those first lets the others find their common start in
        the cache instead of computing it once each."""
        if not self.enabled:
            return []
        groups: dict[bytes, list[int]] = {}
        for i, ids in enumerate(prompts):
            space = namespaces[i] if namespaces else ""
            names = block_names(ids[: BLOCK + 1], space)  # the first block, if whole
            if names and names[0] not in self._where and len(ids) > BLOCK:
                groups.setdefault(names[0], []).append(i)
        return [group[0] for group in groups.values() if len(group) > 1]

    def lookup(self, ids: Sequence[int], namespace: str = "") -> list[int]:
        """The places of the longest cached prefix of `ids` (whole blocks, leaving at least its
        last token to run), marked most recently used."""
        if not self.enabled or not self._where:
            return []
        found = []
        for name in block_names(ids[:-1], namespace):
            place = self._where.get(name)
            if place is None:
                break
            found.append((name, place))
        for name, _ in reversed(found):  # the prefix's start ends up the most recent
            self._where.move_to_end(name)
        return [place for _, place in found]

    def load(self, places: list[int], k: list[torch.Tensor], v: list[torch.Tensor], slot: int):
        """Copy the blocks at `places` into positions 0.. of `slot` of the KV cache `k`, `v`
        (per layer (slots, heads, length, head_dim))."""
        if not places:
            return
        n = len(places) * BLOCK
        index = torch.tensor(places, device=self.device)
        for src, dst in zip(self._k + self._v, k + v, strict=True):
            blocks = src.index_select(0, index)  # (blocks, heads, BLOCK, head_dim)
            dst[slot, :, :n] = blocks.transpose(0, 1).reshape(self.heads, n, self.head_dim)

    def store(
        self,
        ids: Sequence[int],
        k: list[torch.Tensor],
        v: list[torch.Tensor],
        slot: int,
        namespace: str = "",
    ) -> None:
        """Keep the whole blocks of `ids` (tokens whose KV `slot` holds, from position 0) that
        are not cached yet, evicting the least recently used blocks when full."""
        if not self.enabled:
            return
        if not self._k:
            self._allocate()
        names = block_names(ids, namespace)
        kept: list[bytes] = []
        for b, name in enumerate(names):
            if name not in self._where:
                if not self._free:
                    victim = next(iter(self._where))  # the least recently used
                    if victim in kept:  # the budget is smaller than this prefix: keep its start
                        break
                    self._free.append(self._where.pop(victim))
                    self.stats.evictions += 1
                place = self._free.pop()
                for src, dst in zip(k + v, self._k + self._v, strict=True):
                    dst[place] = src[slot, :, b * BLOCK : (b + 1) * BLOCK]
                self._where[name] = place
            kept.append(name)
            self._where.move_to_end(name)
        for name in reversed(kept):  # as in lookup: the prefix's start is the most recent
            self._where.move_to_end(name)
        self.stats.blocks = len(self._where)

    def clear(self) -> None:
        self._where.clear()
        self._k, self._v, self._free = [], [], []
        self.stats.blocks = 0
