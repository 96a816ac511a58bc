"""DeepSpeed ZeRO: the engine configuration, generated from the run's settings (never hand-edited JSON).

The loop keeps its own loss normalisation (per-step target count), LR schedule and data cursor;
DeepSpeed partitions optimizer state (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3).
"""

from __future__ import annotations

from lib.training.config import TrainingConfig


def deepspeed_config(config: TrainingConfig) -> dict:
    """The DeepSpeed config dict for a run (`--mode deepspeed --zero-stage N`)."""
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {
            "stage": config.zero_stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            # ZeRO-3 export gathers full weights on rank 0 (16-bit when training in 16 bits, else fp32)
            "stage3_gather_16bit_weights_on_model_save": config.zero_stage == 3,
        },
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
