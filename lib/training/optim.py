"""Optimizers: AdamW, or Muon on the transformer's weight matrices with AdamW on the rest.

Either way, biases, LayerNorms and the (tied) token and position embeddings get no weight decay.
"""

from __future__ import annotations

import math

import torch

from lib.training.config import native_bf16
from lib.training.settings import OPTIMIZERS as OPTIMIZERS  # the choices live with the settings


def split_parameters(
    model: torch.nn.Module,
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(weight matrices of the transformer blocks, everything else), each parameter once."""
    matrices, rest, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        is_embedding = name.endswith(("wte.weight", "wpe.weight", "lm_head.weight"))
        (matrices if p.ndim >= 2 and not is_embedding else rest).append(p)
    return matrices, rest


def newton_schulz(g: torch.Tensor, steps: int, coefficients, eps: float, dtype) -> torch.Tensor:
    """An approximately orthogonal matrix with g's singular vectors (Muon's quintic Newton-Schulz
    iteration, as in `torch.optim.Muon`), computed in `dtype`."""
    a, b, c = coefficients
    wide = g.size(0) <= g.size(1)
    x = g.to(dtype) if wide else g.T.to(dtype)  # iterate on the wide side: X Xᵀ is the small Gram
    x = x / x.norm().clamp(min=eps)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` (same settings, state and update) with the Newton-Schulz iteration in a
    chosen dtype. torch's runs it in bfloat16, which CPUs without AVX-512 BF16 or AMX emulate: on a
    2-core AMD EPYC (AVX2) a bf16 matmul ran at 1.0 GFLOP/s against fp32's 135, and that one cast
    made an fp32 step of the tiny model 5 times slower (BENCHMARKS.md). `ns_dtype=None` picks bf16
    where the parameters' device computes in it natively and fp32 elsewhere."""

    def __init__(self, params, ns_dtype: torch.dtype | None = None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    def _dtype_for(self, device: torch.device) -> torch.dtype:
        if self.ns_dtype is None:
            self.ns_dtype = torch.bfloat16 if native_bf16(str(device)) else torch.float32
        return self.ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr, momentum = float(group["lr"]), group["momentum"]
            for p, g, buf in zip(params, grads, bufs, strict=True):
                buf.lerp_(g, 1 - momentum)
                update = g.lerp(buf, momentum) if group["nesterov"] else buf
                dtype = self._dtype_for(p.device)
                update = newton_schulz(
                    update, group["ns_steps"], group["ns_coefficients"], group["eps"], dtype
                )
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * muon_lr_ratio(group["adjust_lr_fn"], p))
        return loss


def muon_lr_ratio(adjust_lr_fn: str | None, p: torch.Tensor) -> float:
    """Muon's LR scale for a (rows, cols) matrix: Keller Jordan's sqrt(max(1, rows/cols)), or
    Moonshot's 0.2·sqrt(max(rows, cols)), which matches AdamW's update RMS ("match_rms_adamw")."""
    rows, cols = p.shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


class MuonAdamW:
    """Muon for 2-D weight matrices, AdamW for the other parameters, stepped as one optimizer.

    Muon's step is rescaled to AdamW's update size (`adjust_lr_fn="match_rms_adamw"`), so both take
    the same learning rate and the LR schedule sets every group alike.
    """

    def __init__(
        self,
        matrices: list[torch.nn.Parameter],
        rest: list[torch.nn.Parameter],
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
    ) -> None:
        self.muon = Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(rest, lr=lr, betas=betas, weight_decay=0.0)

    @property
    def param_groups(self) -> list[dict]:
        # read each time: load_state_dict replaces the inner optimizers' group dicts
        return self.muon.param_groups + self.adamw.param_groups

    def step(self, closure=None) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("this training state was saved by another optimizer (expected Muon)")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    name: str = "adamw",
):
    """AdamW (fused on CUDA) with decay on the block matrices, or Muon on them (`name="muon"`)."""
    matrices, rest = split_parameters(model)
    if name == "muon":
        return MuonAdamW(matrices, rest, lr, weight_decay, betas)
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    groups = [
        {"params": matrices, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in matrices + rest)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
