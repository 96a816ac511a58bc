"""Learning-rate schedules as multipliers of the peak LR.

Progress through the schedule is counted in optimizer steps, or, for a run with a wall-clock
budget, in the larger of the step and time fractions, so the LR anneals when the budget ends.
"""

from __future__ import annotations

import math

from lib.training.settings import SCHEDULES as SCHEDULES  # the choices live with the settings


def lr_multiplier(
    step: int,
    *,
    schedule: str,
    warmup_steps: int,
    max_steps: int,
    min_ratio: float = 0.0,
    decay_fraction: float = 0.2,
    time_fraction: float = 0.0,
) -> float:
    """Multiplier in [min_ratio, 1] at optimizer step `step` (0-based).

    All schedules warm up linearly over `warmup_steps`. Then, with progress p from 0 to 1:
    cosine: half-cosine to min_ratio; linear: straight line to min_ratio;
    wsd (warmup-stable-decay): 1 until p = 1 - decay_fraction, then linear to min_ratio; constant: 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    p = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
    p = min(max(p, time_fraction, 0.0), 1.0)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - p)
    stable_until = 1.0 - decay_fraction  # wsd
    if p <= stable_until:
        return 1.0
    return min_ratio + (1 - min_ratio) * (1 - p) / decay_fraction
