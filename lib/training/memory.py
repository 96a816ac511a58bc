"""How much memory a training run needs per device, before it starts.

The model is built on PyTorch's meta device with accelerate's `init_empty_weights` (no memory is
allocated, so even the 1B preset is instant on a laptop), and accelerate's `compute_module_sizes`
gives its bytes. From those:

- model states per parameter: fp32 weights (4 B), fp32 gradients (4 B), optimizer states (AdamW: two
  fp32 moments, 8 B; Muon keeps one momentum for the block matrices and AdamW's two for the rest),
  each divided by the world size where the mode shards it (ZeRO-1: optimizer; ZeRO-2: + gradients;
  ZeRO-3 and FSDP: + weights; DDP: nothing);
- activations per layer of one micro-batch, after Korthikanti et al. (2022, "Reducing Activation
  Recomputation in Large Transformer Models"): s·b·h·34 bytes in 16-bit precision without the
  attention-score term (SDPA does not keep the scores), twice that in fp32; with gradient
  checkpointing only each layer's input (2·s·b·h bytes) plus one layer's full set;
- the logits and their gradient in fp32: 2 · b·s·vocab · 4 bytes.

It is an estimate (allocator slack, temporary buffers and communication buckets come on top), for
choosing a mode, a batch size or gradient checkpointing before a long run.
"""

from __future__ import annotations

from dataclasses import dataclass

from lib.training.config import TrainingConfig

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    weights: float  # bytes per device
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def table(self) -> str:
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("activations", self.activations),
            ("logits", self.logits),
            ("total", self.total),
        ]
        head = f"{self.parameters:,} parameters; per device (estimate):"
        return "\n".join([head, *(f"  {name:<17} {b / GIB:8.2f} GiB" for name, b in rows)])


def count_meta_parameters(config: TrainingConfig) -> tuple[int, int]:
    """(all parameters, those in the blocks' weight matrices) of the run's model, built on the meta
    device: nothing is allocated."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes

    from lib.modeling import build_model

    with init_empty_weights():
        model = build_model(config.model_preset(), vocab_size=config.vocab_size)
    model.tie_weights()  # on the meta device the output embedding is not tied by itself
    total = compute_module_sizes(model, dtype="float32")[""] // 4  # fp32: 4 bytes a parameter
    matrices = sum(p.numel() for n, p in model.transformer.h.named_parameters() if p.ndim == 2)
    return total, matrices


def estimate_memory(config: TrainingConfig, world_size: int = 1) -> MemoryEstimate:
    """Per-device memory of `config`'s run on `world_size` devices."""
    preset = config.model_preset()
    n, matrices = count_meta_parameters(config)
    optimizer_bytes = 8 * n if config.optimizer == "adamw" else 4 * matrices + 8 * (n - matrices)
    shard = 1 / max(world_size, 1)
    stage = {"fsdp": 3, "deepspeed": config.zero_stage or 2}.get(config.mode, 0)
    weights = 4 * n * (shard if stage >= 3 else 1)
    gradients = 4 * n * (shard if stage >= 2 else 1)
    optimizer = optimizer_bytes * (shard if stage >= 1 else 1)
    s, b = config.block_size or preset.n_positions, config.batch_size
    h, L = preset.n_embd, preset.n_layer
    width = 1 if config.precision == "fp32" else 0.5  # 16-bit activations under autocast
    per_layer = s * b * h * 34 * 2 * width
    if config.gradient_checkpointing:
        activations = L * 2 * s * b * h * 2 * width + per_layer
    else:
        activations = L * per_layer
    vocab = config.vocab_size or preset.vocab_size
    return MemoryEstimate(n, weights, gradients, optimizer, activations, 2 * b * s * vocab * 4)
