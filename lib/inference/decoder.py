"""GPT-2 forward passes over a slot KV cache, for continuous batching.

Hugging Face's cache appends one column for the whole batch, so rows that joined at different times
need padding and re-alignment whenever the batch changes. Here every running sequence owns a slot
(row i of the batch lives in slot i), keys and values are written at each row's own position, and
attention masks each row to its own length. A finished row leaves by moving the last slot into its
place, so the live slots stay contiguous and decoding reads the cache without copying it.

The weights are the `GPT2LMHeadModel`'s own tensors (LayerNorms, Conv1D projections, MLP),
called through torch's functional ops so that a step pays no `nn.Module` dispatch per op; the
logits equal `model(...)`'s up to float rounding, and tests compare them.

On a CPU the matrix products go to oneDNN where it is there: on CPUs where MKL does not use
AVX-512 (AMD's, for one) oneDNN's fp32 GEMM is faster than torch's default (MKL's GEMM) for the
output projection at any batch size and for the block matrices from a few rows on (BENCHMARKS.md,
"The decode step"). MKL is a little quicker for one row of the small block matrices, but the two
libraries add in different orders, and a row's logits must not depend on how many rows share the
step: with MKL below 8 rows and oneDNN above, a seeded request's text alone and among 16 others
differed on one VM (a draw near a boundary of its distribution). So every row count takes the same
library, bound to each product once, when the decoder is built. oneDNN is reached through
`torch.ops.mkldnn._linear_pointwise`, an operator of torch's own CPU compiler path; it is checked
against `F.linear` once, when the first decoder is built (nothing runs at import), and left unused
where it is missing or disagrees (then MKL takes every product, again one library for all). Both
compute in fp32; only the order of additions differs. Where oneDNN takes the MLP's first product
(fp32), its GELU runs inside that product (a oneDNN post-op, checked like the product): one pass
over the activations fewer (BENCHMARKS.md has both measurements).

For those products oneDNN reads its own copy of each fp32 weight, reordered once, when the decoder
is built, into the blocked layout its GEMM wants for `PACK_ROWS` rows
(`torch.ops.mkldnn._reorder_linear_weight`, checked like the product): a plain weight is re-laid
out by oneDNN at every call, which on a gpt2-124m-sized model cost a third of a 16-row step
(BENCHMARKS.md, "The decode step against the hardware"). The copies take as much memory as the
matrices themselves (0.5 GB for gpt2-124m); `GPT2SlotDecoder(model, prepack=False)` goes without.
The numbers are the same fp32 products, summed in another order.

A model quantized for serving (`ML_SERVICE_QUANTIZATION=int8`, quantization.py) has `Int8Linear`s
in place of its blocks' Conv1Ds: the decoder calls them as they are (integer products, exact sums,
so again a row's numbers do not depend on its neighbours).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from lib.inference.adapters import RowAdapters
from lib.inference.quantization import Int8Linear

CACHE_STEP = 64  # the cache grows in time by multiples of this many positions
PREPACK_MIN_ROWS = 8  # batches of at least this many rows build oneDNN's reordered weight copies
PACK_ROWS = 64  # the row count oneDNN's reordered weights are laid out for (any count works)


@cache
def onednn_linear():
    """oneDNN's fp32/bf16 `linear` on the CPU (x (N, in), w (out, in), bias, then optionally a
    fused GELU: `gelu="tanh"` or `"none"` (erf)), or None where this torch lacks it or its answer
    differs from `F.linear`'s. Also the GELU forms it fuses correctly (activation name -> form)."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None, {}
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=g) for shape in ((5, 24), (40, 24), (40,)))
        ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
        ok = ok and torch.allclose(
            op(x, w.t().contiguous().t(), None, "none", [], ""), x @ w.t(), atol=1e-5
        )
    except Exception:  # any failure (another torch's signature, a build without it): not used
        return None, {}
    if not ok:
        return None, {}
    fused = {}
    for name, form in (("gelu_pytorch_tanh", "tanh"), ("gelu", "none")):
        with contextlib.suppress(Exception):
            want = F.gelu(F.linear(x, w, b), approximate=form)
            if torch.allclose(op(x, w, b, "gelu", [], form), want, atol=1e-5):
                fused[name] = form
    return partial(_call_onednn, op), fused


@cache
def onednn_bf16() -> bool:
    """Whether oneDNN's `linear` (`onednn_linear`) also takes bf16 here. On an AVX2-only CPU (no
    AVX-512, no AMX) it cannot build a bf16 product and raises, so a bf16 model's products stay
    with `F.linear` there (emulated bf16, slow but right)."""
    if onednn_linear()[0] is None:
        return False
    try:
        g = torch.Generator().manual_seed(2)
        x, w, b = (
            torch.randn(shape, generator=g).bfloat16() for shape in ((5, 24), (40, 24), (40,))
        )
        got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return torch.allclose(got.float(), F.linear(x, w, b).float(), atol=0.05)
    except Exception:  # no bf16 kernel on this CPU (or another torch's signature)
        return False


@cache
def onednn_reorder():
    """oneDNN's weight reorder for `linear` (w (out, in) -> its own layout for N rows), or None
    where this torch lacks it or a product with the reordered weight differs from `F.linear`."""
    if onednn_linear()[0] is None:
        return None
    op = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if op is None:
        return None
    try:
        g = torch.Generator().manual_seed(1)
        x, w, b = (torch.randn(shape, generator=g) for shape in ((5, 24), (40, 24), (40,)))
        linear = torch.ops.mkldnn._linear_pointwise
        packed = op(w, PACK_ROWS)
        ok = torch.allclose(linear(x, packed, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
        want = F.gelu(F.linear(x, w, b), approximate="tanh")
        ok = ok and torch.allclose(linear(x, packed, b, "gelu", [], "tanh"), want, atol=1e-5)
    except Exception:  # another torch's signature, a build without it: plain weights
        return None
    return op if ok else None


def _call_onednn(
    op, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: str | None = None
) -> torch.Tensor:
    if gelu is None:
        return op(x, w, b, "none", [], "")
    return op(x, w, b, "gelu", [], gelu)


class UnsupportedModel(ValueError):
    """The engine decodes GPT-2-family checkpoints (model_type "gpt2") only."""


def _norm(ln) -> tuple:
    return (ln.weight, ln.bias, ln.eps, tuple(ln.normalized_shape))


def _layer_norm(x: torch.Tensor, p: tuple) -> torch.Tensor:
    return torch.layer_norm(x, p[3], p[0], p[1], p[2])  # the op itself: F's wrapper costs a step


def _activation(name: str):
    """GPT-2's activation by its config name (the fused kernels for the common ones)."""
    if name == "gelu_pytorch_tanh":
        return partial(F.gelu, approximate="tanh")
    if name == "gelu":
        return F.gelu
    return ACT2FN[name]  # the module transformers itself would use


Product = Callable[[torch.Tensor], torch.Tensor]  # x (N, in) -> (N, out)


@dataclass(frozen=True)
class _Block:
    """One GPT-2 block as the decoder runs it: its LayerNorms, and its four products (each with
    its bias; `mlp_in` with the activation too), bound at construction to the library that
    computes them (GPT2SlotDecoder.library)."""

    ln_1: tuple
    ln_2: tuple
    scaling: float
    attn: Product  # (N, C) -> (N, 3C): q, k, v
    proj: Product  # attention output projection
    mlp_in: Product  # the MLP's first product and its activation
    mlp_out: Product
    mlp_in_linear: Product  # the MLP's first product alone (a LoRA update goes before the GELU)


def _torch_product(w: torch.Tensor, b: torch.Tensor | None) -> Product:
    """x @ w + b for a Conv1D weight w (in, out), by torch's own library (MKL on x86)."""
    if b is None:
        return partial(torch.matmul, other=w)
    return lambda x: torch.addmm(b, x, w)


class SlotCache:
    """The KV cache every decoder here keeps: per layer, keys and values of shape
    (slots, heads, length, head_dim), row i of the running batch in slot i (module docstring).
    Subclasses set `device` and `dtype` before the first `reserve`."""

    device: torch.device
    dtype: torch.dtype

    def __init__(self, layers: int, n_head: int, head_dim: int, context: int):
        self.layers, self.n_head, self.head_dim, self.context = layers, n_head, head_dim, context
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
        new = partial(torch.zeros, shape, device=self.device, dtype=self.dtype)
        self.k = [new() for _ in range(self.layers)]
        self.v = [new() for _ in range(self.layers)]
        # (old_k is empty on the first call: nothing to keep)
        for new, old in zip(self.k + self.v, old_k + old_v, strict=False):
            new[: self.slots, :, : self.length] = old
        self.slots, self.length = slots, length

    def release(self) -> None:
        self.k, self.v, self.slots, self.length = [], [], 0, 0

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst` (a finished row's place)."""
        for slots in self.k + self.v:
            slots[dst] = slots[src]


class GPT2SlotDecoder(SlotCache):
    """`library`: which library computes the matrix products, "auto" (oneDNN where it is there
    and checked, else torch's; int8 where the model was quantized: quantization.py) or "torch"
    (torch's own, for comparison). `prepack`: oneDNN reads its reordered copies of the fp32
    weights (the module docstring)."""

    prefix_cacheable = True  # prefill(..., cached=) runs the rest of a prompt (prefix_cache.py)

    def __init__(self, model, prepack: bool = True, library: str = "auto"):
        cfg = model.config
        if getattr(cfg, "model_type", None) != "gpt2" or not hasattr(model, "transformer"):
            raise UnsupportedModel(
                f"the serving engine decodes GPT-2-family checkpoints (model_type 'gpt2'); "
                f"got {getattr(cfg, 'model_type', type(model).__name__)!r}"
            )
        tr = model.transformer
        self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
        self.ln_f = _norm(tr.ln_f)
        super().__init__(len(tr.h), cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_positions)
        self.device, self.dtype = self.wte.device, self.wte.dtype
        cpu = self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16)
        linear, fusable = onednn_linear() if cpu and library == "auto" else (None, {})
        if self.dtype == torch.bfloat16 and not onednn_bf16():
            linear = None
        self._onednn = linear
        # the MLP's GELU fused into oneDNN's fp32 product where it computes it right (None:
        # separate). Not in bf16: oneDNN would apply it before rounding the product to bf16.
        fp32 = cpu and self.dtype == torch.float32
        self._fused_gelu = fusable.get(cfg.activation_function) if fp32 else None
        # oneDNN's own layout of the fp32 matrices, for the products it takes (module docstring)
        self._reorder = onednn_reorder() if fp32 and linear is not None and prepack else None
        self.act = _activation(cfg.activation_function)
        self.library = "onednn" if linear is not None else "torch"
        self.packed = self._reorder is not None
        # the MLP's GELU after its product, not fused into it, for every row: set while LoRA
        # adapters are loaded (adapters.py), whose update goes between the two, so that a row's
        # numbers do not depend on whether its neighbours use adapters
        self.unfused_mlp = False
        with torch.no_grad():
            self.blocks = [self._block(block) for block in tr.h]
            self._lm_head = self._head(model.lm_head)

    # -- binding each product to its library, once ----------------------------------------------
    def _product(self, module, gelu: bool = False) -> Product:
        """The product of a Conv1D (weight (in, out)) or an Int8Linear, plus the activation when
        `gelu` (inside oneDNN's product where it fuses it)."""
        if isinstance(module, Int8Linear):
            product = module.forward  # its own int8 product (quantization.py)
        elif self._onednn is None:
            product = _torch_product(module.weight, module.bias)
        else:
            w, b, op = module.weight, module.bias, self._onednn
            # oneDNN takes (out, in): its reordered copy, else the transposed view as it is
            w = w.t() if self._reorder is None else self._reorder(w.t().contiguous(), PACK_ROWS)
            if gelu and self._fused_gelu:
                return lambda x: op(x, w, b, self._fused_gelu)
            product = lambda x: op(x, w, b)  # noqa: E731
        if gelu:
            act = self.act
            return lambda x: act(product(x))
        return product

    def _block(self, block) -> _Block:
        a, m = block.attn, block.mlp
        return _Block(
            ln_1=_norm(block.ln_1),
            ln_2=_norm(block.ln_2),
            scaling=a.scaling,
            attn=self._product(a.c_attn),
            proj=self._product(a.c_proj),
            mlp_in=self._product(m.c_fc, gelu=True),
            mlp_out=self._product(m.c_proj),
            mlp_in_linear=self._product(m.c_fc),
        )

    def _head(self, lm_head) -> Product:
        """The output projection (nn.Linear, weight (vocab, C), tied to the embedding; or an
        Int8Linear): logits in float32."""
        if isinstance(lm_head, Int8Linear):
            return lm_head.forward
        w, op = lm_head.weight, self._onednn
        if op is None:
            return lambda x: F.linear(x, w).float()
        if self._reorder is not None:
            w = self._reorder(w.detach().contiguous(), PACK_ROWS)
        return lambda x: op(x, w, None).float()

    # -- the forward pieces ---------------------------------------------------------------------
    def _attention_inputs(self, w: _Block, h: torch.Tensor, lora=None, layer: int = 0):
        """q, k, v of the block for hidden states h (N, C): each (N, H, hd). `lora`: the step's
        per-row adapter updates (adapters.RowAdapters), or None."""
        N = h.shape[0]
        x = _layer_norm(h, w.ln_1)
        qkv = w.attn(x)  # (N, 3C)
        if lora is not None:
            qkv = lora.add(layer, "attn", x, qkv)
        return qkv.view(N, 3, self.n_head, self.head_dim).unbind(1)

    def _block_rest(
        self, w: _Block, h: torch.Tensor, a: torch.Tensor, lora=None, layer: int = 0
    ) -> torch.Tensor:
        """The attention output projection and the MLP, with their residuals; (N, C)."""
        if lora is None and not self.unfused_mlp:
            h = h + w.proj(a)
            return h + w.mlp_out(w.mlp_in(_layer_norm(h, w.ln_2)))
        if lora is None:  # adapters are loaded, none in this step: the same unfused numbers
            h = h + w.proj(a)
            return h + w.mlp_out(self.act(w.mlp_in_linear(_layer_norm(h, w.ln_2))))
        h = h + lora.add(layer, "proj", a, w.proj(a))
        x = _layer_norm(h, w.ln_2)
        # an adapter's update of the MLP's first product goes before its GELU: unfused
        m = self.act(lora.add(layer, "mlp_in", x, w.mlp_in_linear(x)))
        return h + lora.add(layer, "mlp_out", m, w.mlp_out(m))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B, vocab), float32
        return self._lm_head(_layer_norm(h, self.ln_f))

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.wte) + F.embedding(pos, self.wpe)

    @torch.inference_mode()
    def prefill(
        self,
        prompts: list[list[int]],
        first_slot: int,
        cached: list[int] | None = None,
        lora: RowAdapters | None = None,
    ) -> torch.Tensor:
        """Run whole prompts (one per new slot, from `first_slot` on); logits of their last tokens.
        `cached[i]`: how many of prompt i's first tokens the slot already holds (copied from the
        prefix cache, prefix_cache.py): only the rest of the prompt is run, attending to them.
        `lora`: the rows' adapter updates (adapters.py), or None."""
        if not cached or not any(cached):
            return self._prefill_whole(prompts, first_slot, lora)
        n = len(prompts)
        T = max(len(p) for p in prompts)  # keys: every prompt whole
        rest = [p[c:] for p, c in zip(prompts, cached, strict=True)]
        S = max(len(r) for r in rest)  # queries: the longest part left to run
        self.reserve(first_slot + n, T)
        starts = torch.tensor(cached, device=self.device)
        lens = torch.tensor([len(r) for r in rest], device=self.device)
        # each query's position (padding past a row's end is clamped: its output is unused)
        pos = (starts[:, None] + torch.arange(S, device=self.device)).clamp(max=T - 1)  # (n, S)
        keys = torch.arange(T, device=self.device)
        # (n, 1, S, T): a query sees the keys up to its own position, none past its prompt's end
        mask = ((keys <= pos[:, :, None]) & (keys < (starts + lens)[:, None, None]))[:, None]
        rows = slice(first_slot, first_slot + n)

        def attend(layer: int, w: _Block, q, k, v) -> torch.Tensor:
            for i, (c, r) in enumerate(zip(cached, rest, strict=True)):
                self.k[layer][first_slot + i, :, c : c + len(r)] = k[i, :, : len(r)]
                self.v[layer][first_slot + i, :, c : c + len(r)] = v[i, :, : len(r)]
            keys, values = self.k[layer][rows, :, :T], self.v[layer][rows, :, :T]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=w.scaling)

        return self._run_prompts(self._padded(rest, S), pos, lens, lora, attend)

    def _prefill_whole(
        self, prompts: list[list[int]], first_slot: int, lora: RowAdapters | None = None
    ) -> torch.Tensor:
        """`prefill` with nothing cached: the prompts are the whole sequences (no reads of the
        cache; each attends to its own fresh keys)."""
        n, P = len(prompts), max(len(p) for p in prompts)
        self.reserve(first_slot + n, P)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        pos = torch.arange(P, device=self.device)
        # (n, 1, P, P): causal, and no key past a row's own prompt (right padding)
        causal = torch.ones((P, P), dtype=torch.bool, device=self.device).tril()
        mask = (causal[None] & (pos[None, None, :] < lens[:, None, None]))[:, None]
        rows = slice(first_slot, first_slot + n)

        def attend(layer: int, w: _Block, q, k, v) -> torch.Tensor:
            self.k[layer][rows, :, :P] = k
            self.v[layer][rows, :, :P] = v
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=w.scaling)

        return self._run_prompts(self._padded(prompts, P), pos.expand(n, P), lens, lora, attend)

    def _padded(self, seqs: list[list[int]], length: int) -> torch.Tensor:
        """The token ids of `seqs`, right-padded to `length`: (n, length)."""
        ids = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = torch.tensor(seq)
        return ids.to(self.device)

    def _run_prompts(self, ids, pos, lens, lora, attend) -> torch.Tensor:
        """The blocks over n padded prompts (ids and positions (n, L)), `attend(layer, block, q,
        k, v)` writing each layer's keys and values to the cache and giving its attention output;
        the logits of each prompt's last token (`lens`: its length in ids)."""
        n, L = ids.shape
        h = self._embed(ids, pos).view(n * L, -1)  # (n*L, C)
        lora = None if lora is None else lora.repeated(L)
        for layer, w in enumerate(self.blocks):
            q, k, v = (
                x.view(n, L, self.n_head, self.head_dim).transpose(1, 2)
                for x in self._attention_inputs(w, h, lora, layer)
            )  # (n, H, L, hd)
            a = attend(layer, w, q, k, v)
            h = self._block_rest(w, h, a.transpose(1, 2).reshape(n * L, -1), lora, layer)
        last = h.view(n, L, -1)[torch.arange(n, device=self.device), lens - 1]  # (n, C)
        return self._logits(last)

    @torch.inference_mode()
    def decode(
        self,
        ids: torch.Tensor,
        positions: list[int],
        slots: list[int] | None = None,
        lora: RowAdapters | None = None,
    ) -> torch.Tensor:
        """One new token for each of the first B slots (or of `slots`), at its own position;
        logits (B, vocab). `lora`: the rows' adapter updates (adapters.py), or None."""
        B = len(positions)
        pos = torch.tensor(positions, device=self.device)
        Tk = max(positions) + 1
        # additive (0 / -inf), built once for all layers: SDPA would convert a boolean one per call
        mask = torch.zeros((B, 1, 1, Tk), device=self.device, dtype=self.dtype).masked_fill_(
            (torch.arange(Tk, device=self.device)[None, :] > pos[:, None])[:, None, None, :],
            float("-inf"),
        )
        h = self._embed(ids.to(self.device), pos)  # (B, C)
        rows = (
            torch.arange(B, device=self.device)
            if slots is None
            else torch.tensor(slots, device=self.device)
        )
        for layer, w in enumerate(self.blocks):
            q, k, v = self._attention_inputs(w, h, lora, layer)  # (B, H, hd)
            self.k[layer][rows, :, pos] = k
            self.v[layer][rows, :, pos] = v
            if slots is None:  # the live slots are contiguous: a view, no copy
                keys, values = self.k[layer][:B, :, :Tk], self.v[layer][:B, :, :Tk]
            else:
                keys, values = self.k[layer][rows, :, :Tk], self.v[layer][rows, :, :Tk]
            a = F.scaled_dot_product_attention(
                q[:, :, None], keys, values, attn_mask=mask, scale=w.scaling
            )  # (B, H, 1, hd)
            h = self._block_rest(w, h, a.view(B, -1), lora, layer)
        return self._logits(h)
