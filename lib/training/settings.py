"""The training settings, in groups: what to train and where, the optimisation and its length,
evaluation, what a run saves, reporting, and the hardware (like litgpt's separate train, eval
and log arguments).

Each field carries its default, help text and command-line form (`lib.cli.setting`); the
command line is generated from them, so a flag's name, default and help live here only.
`TrainingConfig` (lib/training/config.py) gathers the groups into one flat set of settings and
checks and resolves them. Imports no torch: the CLI parses its arguments before heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lib.cli import parse_count, parse_duration, parse_optional_path, setting
from lib.presets import PRESETS

MODES = ("baseline", "fsdp", "deepspeed")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "linear", "constant")
TOKENIZER_TYPES = ("bpe", "char")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
REPORT_TO = ("none", "wandb", "tensorboard")
WANDB_MODES = ("online", "offline", "disabled")
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2's attention and MLP projections (Conv1D)
# defaults that follow the run's length (TrainingConfig.resolved)
WARMUP_FRACTION, WARMUP_CAP = 0.1, 50  # warm-up: 10% of the steps, at most 50
EVALS_PER_RUN, EVAL_EVERY_CAP = 6, 150  # validation about 6 times a run, at least every 150 steps


@dataclass
class RunSettings:
    """What to train, on what, and where: the model, the mode, the data and the tokenizer, the
    run's directory."""

    preset: str = setting("tiny", "model size (lib/presets.py)", choices=tuple(PRESETS))
    mode: str = setting(
        "baseline",
        "baseline: one process, or DDP when launched by torchrun; fsdp: FSDP2 sharding; "
        "deepspeed: ZeRO (launch both with torchrun or deepspeed)",
        choices=MODES,
    )
    zero_stage: int | None = setting(
        None, "DeepSpeed ZeRO stage (--mode deepspeed only; default 2)", choices=(1, 2, 3)
    )
    data: str = setting(
        "bundled",
        "'bundled' (Russian corpus), a .txt/.jsonl file or directory, or a `datasets` name",
    )
    train_extra: tuple[str, ...] = setting(
        (),
        "more training text, added to the training split only (a .txt/.jsonl file or "
        "directory; `make corpus` writes the Wesnoth and fortunes ones): the validation split "
        "stays --data's, so its figure stays comparable; repeat for more",
        metavar="SOURCE",
    )
    join_documents: int = setting(
        0,
        "join consecutive training documents (in corpus order) into passages of up to this many "
        "characters, separated by a space instead of the end-of-text token, so that a short "
        "sentence is not always followed by the end of a text (0: each document alone; the "
        "validation split stays as it is)",
        metavar="CHARS",
    )
    eval_data: tuple[str, ...] = setting(
        (),
        "a named held-out set, NAME=PATH (.txt/.jsonl file or directory), evaluated with the "
        "validation split (bits/byte in the log and the training card); training documents that "
        "contain one of its texts are dropped (not when streaming); repeat for more",
        metavar="NAME=PATH",
    )
    streaming: bool = setting(
        False,
        "stream --data (a local .txt/.jsonl or a `datasets` name) in one pass instead of "
        "loading it whole",
    )
    output_dir: Path = setting(
        Path("runs/baseline"),
        "run directory: OUTPUT_DIR/final (export) and OUTPUT_DIR/checkpoints (training state)",
    )
    run_name: str | None = setting(
        None,
        "model id recorded in the checkpoint and the W&B run name (default: the output "
        "directory's name)",
    )
    resume: str | None = setting(
        None,
        "'auto' (newest complete checkpoint in OUTPUT_DIR, or a fresh start) or a checkpoint path",
    )
    tokenizer: str | None = setting(
        None,
        "existing tokenizer directory (default: train a new one); the model's vocabulary is "
        "sized to it",
    )
    tokenizer_type: str = setting(
        "bpe",
        "the tokenizer trained on the training split: bpe (byte-level BPE of --vocab-size "
        "tokens) or char (one token per character, UTF-8 bytes for the rest; the vocabulary is "
        "sized to it)",
        choices=TOKENIZER_TYPES,
    )
    cache_dir: Path | None = setting(
        Path(".cache/tokens"),
        "memory-mapped token cache, keyed by tokenizer and data ('none' disables)",
        parse=parse_optional_path,
        metavar="DIR",
    )
    vocab_size: int | None = setting(
        None, "vocabulary of a newly trained tokenizer (default: the preset's)"
    )
    block_size: int | None = setting(None, "training context length (default: the preset's)")
    short_context: int | None = setting(
        None,
        "train on rows this long (each block cut into pieces: the same tokens per step) for the first "
        "part of the run, then at the full block size; must divide it",
    )
    short_context_until: float = setting(
        0.75, "the share of the run (of its time budget, or else of its steps) at --short-context"
    )
    n_layer: int | None = setting(None, "transformer blocks (default: the preset's)")
    n_embd: int | None = setting(
        None, "model width, a multiple of the head count (default: the preset's)"
    )
    n_head: int | None = setting(None, "attention heads (default: the preset's)")
    val_fraction: float = setting(0.05, "share of the documents held out for validation")


@dataclass
class LoraSettings:
    """Fine-tuning a LoRA adapter (peft) on a base checkpoint's frozen weights instead of training
    from scratch: the tokenizer, the shape and the context are the base's."""

    init_from: str | None = setting(
        None,
        "the base checkpoint directory to fine-tune (e.g. models/default); needs --lora-rank",
        metavar="CHECKPOINT",
    )
    lora_rank: int | None = setting(
        None,
        "train a LoRA adapter of this rank on --init-from's frozen weights; OUTPUT_DIR/final is "
        "then a PEFT adapter directory (adapter_config.json + adapter_model.safetensors), and "
        "--val-fraction is the share of --data's documents, its last ones, held out",
        metavar="R",
    )
    lora_alpha: float | None = setting(
        None,
        "LoRA scaling numerator: the update is B·A·alpha/rank (default: twice the rank)",
        metavar="A",
    )
    lora_targets: str = setting(
        ",".join(LORA_TARGETS),
        "the base model's modules to adapt, comma-separated names or name suffixes "
        "(GPT-2: c_attn, c_proj, c_fc, attn.c_proj, mlp.c_proj)",
        metavar="NAMES",
    )
    lora_dropout: float = setting(0.0, "dropout on the adapter's input", metavar="P")
    merge: bool = setting(
        False,
        "write OUTPUT_DIR/final as a full checkpoint, the adapter merged into the base's weights "
        "(loads in plain transformers, serves as any checkpoint), instead of an adapter directory",
    )


@dataclass
class TrainSettings:
    """The optimisation and the length of the run."""

    batch_size: int = setting(8, "sequences per micro-batch (per process)")
    grad_accum: int = setting(
        1, "micro-batches per optimizer step (loss-equivalent to a bigger batch)"
    )
    optimizer: str = setting(
        "adamw",
        "adamw, or muon: Muon on the transformer's weight matrices, AdamW on the rest",
        choices=OPTIMIZERS,
    )
    lr: float = setting(3e-3, "peak learning rate")
    min_lr_ratio: float = setting(0.1, "final LR as a fraction of the peak")
    weight_decay: float = setting(0.1, "decay on the blocks' weight matrices (AdamW's or Muon's)")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW's betas", metavar="BETA")
    grad_clip: float = setting(1.0, "gradient-norm clipping threshold")
    scheduler: str = setting(
        "cosine", "LR schedule after warm-up (wsd = warmup-stable-decay)", choices=SCHEDULES
    )
    warmup_steps: int | None = setting(
        None,
        f"linear warm-up steps (default: {WARMUP_FRACTION:.0%} of --max-steps, at most "
        f"{WARMUP_CAP}: {WARMUP_CAP} for 900 steps, 0 for 6)",
    )

    # length of the run
    max_steps: int = setting(900, "optimizer steps (with --time-limit: the most it may take)")
    max_tokens: int | None = setting(
        None,
        "token budget instead of --max-steps (e.g. 2.5M, 10B): "
        "steps = tokens / (batch x accum x context x processes)",
        parse=parse_count,
        metavar="COUNT",
    )
    time_limit_s: float | None = setting(
        None,
        "wall-clock budget (e.g. 3h30m, 11m): the LR anneals by then; save, export and exit 0 "
        "before it ends",
        flag="--time-limit",
        parse=parse_duration,
        metavar="DURATION",
    )


@dataclass
class EvalSettings:
    """Validation during the run (the end of the run evaluates the whole split)."""

    eval_every: int | None = setting(
        None,
        f"validation every N steps, 0: only at the end (default: --max-steps / {EVALS_PER_RUN}, "
        f"at most {EVAL_EVERY_CAP}: {EVAL_EVERY_CAP} for 900 steps, 0 under {EVALS_PER_RUN})",
    )
    eval_batches: int | None = setting(
        None, "validation batches per evaluation during training (default: the whole split)"
    )


@dataclass
class SaveSettings:
    """What a run writes besides its final checkpoint: training-state checkpoints, sample
    continuations, the ONNX export."""

    save_every: int = setting(
        0, "training-state checkpoint every N steps (0: only on an early stop)"
    )
    save_total_limit: int | None = setting(3, "training-state checkpoints kept (the newest)")
    sample_every: int = setting(
        0, "log sample continuations every N steps (0: only in the training card)"
    )
    export_onnx: str | None = setting(
        None,
        "after the run, export OUTPUT_DIR/final to ONNX in OUTPUT_DIR/final/onnx, checked "
        "against PyTorch (int8: also model.int8.onnx; the exporter lives in .venv-onnx: "
        "`make onnx-venv`)",
        flag="--onnx",
        choices=("fp32", "int8"),
        aliases={"--export-onnx": ("fp32", "same as --onnx fp32")},
    )
    onnx_exporter_python: str | None = setting(
        None,
        "the Python interpreter that has the ONNX exporter (optimum-onnx) for --export-onnx "
        "(default: .venv-onnx's, else this one if it has the exporter; the CLI takes "
        "$ML_ONNX_EXPORTER_PYTHON when set)",
        metavar="PYTHON",
    )


@dataclass
class LogSettings:
    """Where the metrics go, and what throughput is measured against."""

    report_to: str = setting("none", "metrics sink (wandb: see --wandb-mode)", choices=REPORT_TO)
    wandb_project: str = setting("ru-gpt", "W&B project (the CLI takes $WANDB_PROJECT when set)")
    wandb_mode: str = setting(
        "offline",
        "W&B mode: offline logs to OUTPUT_DIR/wandb without ever prompting (upload later with "
        "`wandb sync`); the CLI takes $WANDB_MODE when set, else online when WANDB_API_KEY is set",
        choices=WANDB_MODES,
    )
    peak_tflops: float | None = setting(
        None, "the device's dense peak TFLOP/s for MFU (detected for A100/H100/H200)"
    )


@dataclass
class SystemSettings:
    """Hardware, numerics and the process."""

    device: str | None = setting(None, "torch device (default: cuda when available, else cpu)")
    precision: str = setting(
        "fp32",
        "autocast precision; auto: bf16 where the device computes in it natively (CUDA with bf16, "
        "CPUs with AVX-512 BF16 or AMX), else fp32",
        choices=PRECISIONS,
        aliases={
            "--bf16": ("bf16", "bfloat16 autocast (GPUs with bf16, recent CPUs)"),
            "--fp16": ("fp16", "float16 autocast with a gradient scaler (CUDA only)"),
        },
    )
    gradient_checkpointing: bool = setting(
        False, "recompute activations in backward to save memory"
    )
    compile: bool = setting(False, "torch.compile the model")
    dropout: float = setting(0.0, "dropout probability")
    seed: int = setting(1337, "seed for init, data order and sampling")
    num_threads: int | None = setting(
        None, "torch CPU threads (default: torch's choice)", flag="--threads", metavar="N"
    )
    progress: bool = setting(True, "progress bar")
