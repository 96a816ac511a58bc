"""Model presets and training settings, as data.

A preset fixes the architecture of a GPT-2-family model. The training settings are one typed
object resolved once (from the CLI or code) and passed down; nothing below reads the environment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "default"
EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class ModelPreset:
    """Architecture of a GPT-2-family causal LM."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    description: str

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def approx_parameters(self) -> int:
        """Parameter count of GPT-2 with tied input/output embeddings (exact for `build_model`)."""
        d, L = self.n_embd, self.n_layer
        per_block = 12 * d * d + 13 * d  # attention (4d^2+4d) + MLP (8d^2+5d) + 2 LayerNorms (4d)
        embeddings = self.vocab_size * d + self.n_positions * d
        return L * per_block + embeddings + 2 * d  # + final LayerNorm


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        # The embedded default: trained in about 12 minutes on 2 CPU cores (see HOW_TO_USE.md).
        ModelPreset(
            "tiny",
            n_layer=4,
            n_head=4,
            n_embd=192,
            n_positions=256,
            vocab_size=8192,
            description="embedded default, 3.4M parameters, trains in 11 minutes on 2 CPU cores",
        ),
        # The OpenAI GPT-2 family sizes (vocabulary of 50,257 as in the original).
        ModelPreset("gpt2-124m", 12, 12, 768, 1024, 50257, "GPT-2 small"),
        ModelPreset("gpt2-350m", 24, 16, 1024, 1024, 50257, "GPT-2 medium"),
        ModelPreset("gpt2-774m", 36, 20, 1280, 1024, 50257, "GPT-2 large"),
        ModelPreset("gpt2-1.5b", 48, 25, 1600, 1024, 50257, "GPT-2 XL"),
        # ~1.0B with a Russian 50k vocabulary padded to a multiple of 128; heads of size 128 keep
        # attention matmuls efficient on tensor cores, 24 layers keep the model shallow and wide.
        ModelPreset(
            "gpt2-1b",
            24,
            14,
            1792,
            2048,
            50304,
            "1.0B, 24 layers x 1792 wide, 14 heads of 128, 50,304-token Russian vocabulary",
        ),
    ]
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


@dataclass
class TrainingConfig:
    """Everything one training run needs, resolved once and passed down."""

    preset: str = "tiny"
    mode: str = "baseline"  # baseline (one process, or DDP under torchrun) | fsdp | deepspeed
    zero_stage: int = 2  # DeepSpeed ZeRO stage (mode deepspeed)
    streaming: bool = (
        False  # stream a large local/`datasets` source in one pass instead of loading it
    )
    data: str = "bundled"  # "bundled" (Russian corpus), a local .txt/.jsonl file or dir, or a `datasets` name
    output_dir: Path = REPO_ROOT / "runs" / "baseline"
    run_name: str | None = (
        None  # the model id in the checkpoint; default: the output directory's name
    )
    tokenizer: str | None = (
        None  # existing tokenizer dir; None trains a new one on the training split
    )
    vocab_size: int | None = None  # overrides the preset's vocabulary when training a tokenizer
    block_size: int | None = (
        None  # context length for training; defaults to the preset's n_positions
    )
    batch_size: int = 16
    grad_accum: int = 1
    optimizer: str = "adamw"  # adamw | muon (Muon on the block matrices, AdamW on the rest)
    lr: float = 3e-3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    scheduler: str = "cosine"  # cosine | wsd | linear | constant
    warmup_steps: int = 100
    max_steps: int = 1000
    time_limit_s: float | None = None  # wall-clock budget: stop (and export) once it is spent
    eval_every: int = 200
    eval_batches: int | None = None  # None: the whole validation split
    val_fraction: float = 0.05
    dropout: float = 0.0
    seed: int = 1337
    num_threads: int | None = None
    progress: bool = True
    device: str | None = None  # None: cuda when available, else cpu
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler, CUDA only)
    gradient_checkpointing: bool = False
    compile: bool = False
    resume: str | None = (
        None  # None | "auto" (newest complete state checkpoint in output_dir) | a path
    )
    save_every: int = 0  # training-state checkpoint every N steps (0: only when stopped early)
    save_total_limit: int | None = 3  # state checkpoints kept (newest)
    sample_every: int = 0  # log sample continuations every N steps (0: only in the final card)
    cache_dir: Path | None = (
        REPO_ROOT / ".cache" / "tokens"
    )  # memory-mapped token cache (None: off)
    report_to: str = "none"  # none | wandb | tensorboard
    peak_tflops: float | None = None  # the device's dense peak, for MFU when it is not detected
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        return d
