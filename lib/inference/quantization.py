"""Serving precisions: int8 weights for the torch backend on CPUs (`ML_SERVICE_QUANTIZATION`).

`quantize(model, "int8")` replaces the GPT-2 blocks' four projections (Hugging Face `Conv1D`s)
with `Int8Linear`s, in place: the weight in int8 with one scale per output channel, and at every
call the input quantized to int8 with one scale per row (per token, symmetric, dynamic). The
product is an integer one, `torch._int_mm` (oneDNN's int8 GEMM on x86, with VNNI where the CPU has
it), rescaled to float afterwards. So the weights are read at a quarter of their fp32 size, and
the sums are exact integers: a row's result never depends on the rows beside it or on how the
library splits the work, which keeps a request's text the same alone and in a batch.

Everything that runs the model goes through the replaced modules: the engine's slot decoder
(decoder.py reads the `Int8Linear`s as they are), and Hugging Face's own forward (scoring,
prompt logprobs, bits/byte evaluations). The token embedding stays fp32; the output projection,
tied to it, stays fp32 too unless `lm_head=True` (BENCHMARKS.md, "int8 on CPUs", has both).

torch's older dynamic quantization (`torch.ao`'s `quantize_dynamic`, FBGEMM) is faster on a
product alone but scales the input once per call for the whole batch: a row's numbers would
change with its neighbours. torchao's int8 path in eager mode measured slower than fp32 here.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from lib.inference.registry import check_quantization
from lib.modeling import count_parameters

QMAX = 127  # symmetric int8: -127..127 (no -128, so negation is exact)


class QuantizationUnavailable(RuntimeError):
    """This torch build or CPU cannot run the requested serving precision."""


class Int8Linear(nn.Module):
    """y = x W^T + b, W int8 per output channel, x int8 per row at each call (module docstring).
    Takes and returns float32 (other float inputs are computed in float32 and cast back)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """`weight` (out, in) in any float dtype; `bias` (out,) or None."""
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / QMAX
        q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        # _int_mm reads the (in, out) transpose of this buffer as a view: no copy per call
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    @classmethod
    def from_conv1d(cls, conv) -> Int8Linear:
        """From a Hugging Face GPT-2 `Conv1D` (its weight is (in, out))."""
        return cls(conv.weight.t(), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1]).float()
        s = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(QMAX)  # (N, 1)
        q = torch.round(x2 / s).to(torch.int8)  # |x / s| <= 127: no clamp needed
        y = torch._int_mm(q, self.qweight.t()).float().mul_(s).mul_(self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        y = y.view(*shape[:-1], self.out_features)
        return y if dtype == torch.float32 else y.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


@cache
def int8_available() -> str | None:
    """None where int8 products run here, else why not (checked once, on first use: a small
    product against the float one)."""
    if not hasattr(torch, "_int_mm"):
        return f"torch {torch.__version__} has no int8 matrix product (torch._int_mm)"
    try:
        g = torch.Generator().manual_seed(0)
        w, b, x = (torch.randn(s, generator=g) for s in ((24, 40), (24,), (3, 40)))
        got = Int8Linear(w, b)(x)
        want = torch.nn.functional.linear(x, w, b)
        err = (got - want).abs().max().item() / want.abs().max().item()
    except Exception as e:  # a build or CPU without the kernel
        return f"the int8 matrix product failed on this CPU ({type(e).__name__}: {e})"
    if not err < 0.05:
        return f"the int8 matrix product is wrong on this CPU (relative error {err:.3f})"
    return None


def quantize(model, quantization: str, *, lm_head: bool = False):
    """`model` (a GPT-2 LM) served in `quantization`, changed in place and returned; "none"
    leaves it as it is. Raises QuantizationUnavailable where this CPU or torch cannot."""
    if quantization == "none":
        return model
    check_quantization(quantization, str(next(model.parameters()).device), "float32")
    why = int8_available()
    if why is not None:
        raise QuantizationUnavailable(why)
    for block in model.transformer.h:
        a, m = block.attn, block.mlp
        a.c_attn, a.c_proj = Int8Linear.from_conv1d(a.c_attn), Int8Linear.from_conv1d(a.c_proj)
        m.c_fc, m.c_proj = Int8Linear.from_conv1d(m.c_fc), Int8Linear.from_conv1d(m.c_proj)
    if lm_head:
        model.lm_head = Int8Linear(model.lm_head.weight, None)
    model.serving_quantization = quantization  # what quantization_of reads
    return model


def served_parameters(model) -> int:
    """The model's weights as it serves them: its parameters plus the int8 matrices (and their
    biases) that `quantize` moved into buffers (what sizes its step; limits.default_math_threads)."""
    quantized = 0
    if isinstance(model, nn.Module):
        quantized = sum(
            m.qweight.numel() + (0 if m.bias is None else m.bias.numel())
            for m in model.modules()
            if isinstance(m, Int8Linear)
        )
    return count_parameters(model) + quantized


def quantization_of(model) -> str:
    """The serving precision `quantize` gave `model` ("none" for a plain one)."""
    return getattr(model, "serving_quantization", "none")
