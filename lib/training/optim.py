"""Optimizers: AdamW, or Muon for the hidden matrices with AdamW for the rest.

Weight decay applies only to the weight matrices of the transformer blocks: never to biases,
LayerNorms or the (tied) token and position embeddings.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "muon")


def split_parameters(model: torch.nn.Module) -> tuple[list, list, list]:
    """(block matrices, embeddings, biases and norms), each parameter once (tied weights too)."""
    matrices, embeddings, others, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
            embeddings.append(p)
        elif p.ndim >= 2:
            matrices.append(p)
        else:
            others.append(p)
    return matrices, embeddings, others


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepping together, seen as one (param_groups, state_dict, zero_grad)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]
        self.defaults = {}
        self.state = {}

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    name: str = "adamw",
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or Muon+AdamW; every group's LR is the peak LR times the schedule."""
    matrices, embeddings, others = split_parameters(model)
    fused = all(p.is_cuda for p in matrices + embeddings + others) or None
    if name == "adamw":
        groups = [
            {"params": matrices, "weight_decay": weight_decay},
            {"params": embeddings + others, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    if name == "muon":
        # Muon orthogonalises the updates of 2-D hidden matrices; "match_rms_adamw" scales them
        # to AdamW's update size, so the same peak LR serves both optimizers.
        muon = torch.optim.Muon(
            matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"
        )
        adamw = torch.optim.AdamW(
            embeddings + others, lr=lr, betas=betas, weight_decay=0.0, fused=fused
        )
        return CombinedOptimizer([muon, adamw])
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
