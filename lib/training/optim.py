"""AdamW with weight decay only on the weight matrices of the transformer blocks."""

from __future__ import annotations

import torch


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """No decay on biases, LayerNorms and the (tied) token and position embeddings; fused on CUDA."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        is_embedding = name.endswith(("wte.weight", "wpe.weight", "lm_head.weight"))
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
