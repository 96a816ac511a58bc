"""Optimizers: AdamW, or Muon on the transformer's weight matrices with AdamW on the rest.

Either way, biases, LayerNorms and the (tied) token and position embeddings get no weight decay.
"""

from __future__ import annotations

import torch

from lib.config import OPTIMIZERS as OPTIMIZERS  # the choices live with the settings


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
        self.muon = torch.optim.Muon(
            matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"
        )
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
