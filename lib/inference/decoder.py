"""GPT-2 forward passes over a slot KV cache, for continuous batching.

Hugging Face's cache appends one column for the whole batch, so rows that joined at different times
need padding and re-alignment whenever the batch changes. Here every running sequence owns a slot
(row i of the batch lives in slot i), keys and values are written at each row's own position, and
attention masks each row to its own length. A finished row leaves by moving the last slot into its
place, so the live slots stay contiguous and decoding reads the cache without copying it.

The weights are the `GPT2LMHeadModel`'s own modules (LayerNorms, Conv1D projections, MLP), so the
logits equal `model(...)`'s up to float rounding; tests compare them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CACHE_STEP = 64  # the cache grows in time by multiples of this many positions


class UnsupportedModel(ValueError):
    """The engine decodes GPT-2-family checkpoints (model_type "gpt2") only."""


class GPT2SlotDecoder:
    def __init__(self, model):
        cfg = model.config
        if getattr(cfg, "model_type", None) != "gpt2" or not hasattr(model, "transformer"):
            raise UnsupportedModel(
                f"the serving engine decodes GPT-2-family checkpoints (model_type 'gpt2'); "
                f"got {getattr(cfg, 'model_type', type(model).__name__)!r}"
            )
        self.model = model
        self.blocks = list(model.transformer.h)
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.context = cfg.n_positions
        weight = model.transformer.wte.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.slots = 0  # allocated slots
        self.length = 0  # allocated positions per slot

    def reserve(self, slots: int, length: int) -> None:
        """Make room for `slots` rows of up to `length` positions, keeping what is cached."""
        length = min(self.context, -(-length // CACHE_STEP) * CACHE_STEP)
        if slots <= self.slots and length <= self.length:
            return
        slots, length = max(slots, self.slots), max(length, self.length)
        shape = (slots, self.n_head, length, self.head_dim)
        old_k, old_v = self.k, self.v
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.blocks]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.blocks]
        # (old_k is empty on the first call: nothing to keep)
        for new, old in zip(self.k + self.v, old_k + old_v, strict=False):
            new[: self.slots, :, : self.length] = old
        self.slots, self.length = slots, length

    def release(self) -> None:
        self.k, self.v, self.slots, self.length = [], [], 0, 0

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst` (a finished row's place)."""
        for cache in self.k + self.v:
            cache[dst] = cache[src]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, H, T, hd)
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def _mlp(self, block, h: torch.Tensor) -> torch.Tensor:
        return h + block.mlp(block.ln_2(h))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B, vocab), float32
        return self.model.lm_head(self.model.transformer.ln_f(h)).float()

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        tr = self.model.transformer
        return tr.wte(ids) + tr.wpe(pos)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], first_slot: int) -> torch.Tensor:
        """Run whole prompts (one per new slot, from `first_slot` on); logits of their last tokens."""
        n, P = len(prompts), max(len(p) for p in prompts)
        self.reserve(first_slot + n, P)
        ids = torch.zeros((n, P), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        ids = ids.to(self.device)
        pos = torch.arange(P, device=self.device)
        # (n, 1, P, P): causal, and no key past a row's own prompt (right padding)
        causal = torch.ones((P, P), dtype=torch.bool, device=self.device).tril()
        mask = (causal[None] & (pos[None, None, :] < lens[:, None, None]))[:, None]
        h = self._embed(ids, pos[None].expand(n, P))  # (n, P, C)
        rows = slice(first_slot, first_slot + n)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attn.c_attn(block.ln_1(h)).split(h.shape[-1], dim=2)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)
            self.k[layer][rows, :, :P] = k
            self.v[layer][rows, :, :P] = v
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=block.attn.scaling)
            h = h + block.attn.c_proj(a.transpose(1, 2).reshape(n, P, -1))
            h = self._mlp(block, h)
        last = h[torch.arange(n, device=self.device), lens - 1]  # (n, C)
        return self._logits(last)

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One new token for each of the first B slots, at its own position; logits (B, vocab)."""
        B = len(positions)
        pos = torch.tensor(positions, device=self.device)
        Tk = max(positions) + 1
        mask = (torch.arange(Tk, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
        h = self._embed(ids.to(self.device)[:, None], pos[:, None])  # (B, 1, C)
        rows = torch.arange(B, device=self.device)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attn.c_attn(block.ln_1(h)).split(h.shape[-1], dim=2)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B, H, 1, hd)
            self.k[layer][rows, :, pos] = k[:, :, 0]
            self.v[layer][rows, :, pos] = v[:, :, 0]
            keys, values = self.k[layer][:B, :, :Tk], self.v[layer][:B, :, :Tk]
            a = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=block.attn.scaling
            )
            h = h + block.attn.c_proj(a.transpose(1, 2).reshape(B, 1, -1))
            h = self._mlp(block, h)
        return self._logits(h[:, 0])
