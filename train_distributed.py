#!/usr/bin/env python
"""Train a GPT-2-family model from scratch and export a Hugging Face-format checkpoint.

    python train_distributed.py --preset tiny --max-steps 900 --output-dir runs/baseline
    python train_distributed.py --output-dir runs/baseline --resume auto     # continue a stopped run

The checkpoint lands in OUTPUT_DIR/final; serve it with `make serve-trained CHECKPOINT=OUTPUT_DIR/final`.
Resumable training state is kept in OUTPUT_DIR/checkpoints/step-NNNNNNN.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

from lib.config import PRESETS, TrainingConfig
from lib.training.optim import OPTIMIZERS
from lib.training.schedulers import SCHEDULES

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """'3h30m', '90m', '45s' or plain seconds -> seconds."""
    m = _DURATION.match(text.strip())
    if not text.strip() or not m or not any(m.groups()):
        raise argparse.ArgumentTypeError(f"bad duration {text!r}; use e.g. 3h30m, 90m, 600s or 600")
    h, mnt, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mnt * 60 + s


def parse_count(text: str) -> int:
    """'2.5M', '10B', '300k' or a plain number -> an integer."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMbB]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad count {text!r}; use e.g. 300k, 2.5M, 10B or 5000000")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()])


def steps_for_tokens(args: argparse.Namespace) -> int:
    """Optimizer steps that consume the --max-tokens budget (at least one)."""
    import os

    context = args.block_size or PRESETS[args.preset].n_positions
    per_step = args.batch_size * args.grad_accum * context * int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, -(-args.max_tokens // per_step))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a(
        "--mode",
        choices=["baseline", "fsdp", "deepspeed"],
        default="baseline",
        help="baseline: one process, or DDP when launched by torchrun; fsdp: FSDP2 sharding; deepspeed: ZeRO (launch both with torchrun or deepspeed)",
    )
    a(
        "--zero-stage",
        type=int,
        choices=[1, 2, 3],
        help="DeepSpeed ZeRO stage (--mode deepspeed; default 2)",
    )
    a("--preset", choices=list(PRESETS), default="tiny", help="model size (lib/config.py)")
    a(
        "--data",
        default="bundled",
        help="'bundled' (Russian corpus), a .txt/.jsonl file or directory, or a `datasets` name",
    )
    a(
        "--output-dir",
        type=Path,
        default=Path("runs/baseline"),
        help="run directory: OUTPUT_DIR/final (export) and OUTPUT_DIR/checkpoints (training state)",
    )
    a(
        "--run-name",
        help="model id recorded in the checkpoint and the W&B run name (default: the output dir's name)",
    )
    a(
        "--resume",
        help="'auto' (newest complete checkpoint in OUTPUT_DIR, or a fresh start) or a checkpoint path",
    )
    a(
        "--streaming",
        action="store_true",
        help="stream --data (a local .txt/.jsonl or a `datasets` name) in one pass instead of loading it whole",
    )
    a("--tokenizer", help="existing tokenizer directory (default: train a new BPE)")
    a(
        "--cache-dir",
        default=".cache/tokens",
        help="memory-mapped token cache, keyed by tokenizer and data ('none' disables)",
    )
    a(
        "--vocab-size",
        type=int,
        help="vocabulary of a newly trained tokenizer (default: the preset's)",
    )
    a("--block-size", type=int, help="training context length (default: the preset's)")
    a("--batch-size", type=int, default=8, help="sequences per micro-batch")
    a(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches per optimizer step (loss-equivalent to a bigger batch)",
    )
    a(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="adamw, or muon: Muon on the transformer's weight matrices, AdamW on the rest",
    )
    a("--lr", type=float, default=3e-3, help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    a(
        "--weight-decay",
        type=float,
        default=0.1,
        help="decay on the blocks' weight matrices (AdamW's or Muon's)",
    )
    a(
        "--scheduler",
        choices=SCHEDULES,
        default="cosine",
        help="LR schedule after warm-up (wsd = warmup-stable-decay)",
    )
    a("--warmup-steps", type=int, default=50, help="linear warm-up steps")
    a("--max-steps", type=int, default=900, help="optimizer steps")
    a(
        "--max-tokens",
        type=parse_count,
        help="token budget instead of --max-steps (e.g. 2.5M, 10B): steps = tokens / (batch x accum x context x processes)",
    )
    a(
        "--time-limit",
        type=parse_duration,
        help="wall-clock budget (e.g. 3h30m, 11m): the LR anneals by then; save, export and exit 0 before it ends",
    )
    a("--eval-every", type=int, default=150, help="validation every N steps (0: only at the end)")
    a(
        "--save-every",
        type=int,
        default=0,
        help="training-state checkpoint every N steps (0: only on an early stop)",
    )
    a(
        "--save-total-limit",
        type=int,
        default=3,
        help="training-state checkpoints kept (the newest)",
    )
    a(
        "--sample-every",
        type=int,
        default=0,
        help="log sample continuations every N steps (0: only in the card)",
    )
    a(
        "--report-to",
        choices=["none", "wandb", "tensorboard"],
        default="none",
        help="metrics sink; wandb runs offline when WANDB_API_KEY is unset",
    )
    precision = p.add_mutually_exclusive_group()
    precision.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast (GPUs with bf16, recent CPUs)"
    )
    precision.add_argument(
        "--fp16", action="store_true", help="float16 autocast with a gradient scaler (CUDA only)"
    )
    a(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in backward to save memory",
    )
    a("--compile", action="store_true", help="torch.compile the model")
    a("--device", help="torch device (default: cuda when available, else cpu)")
    a(
        "--peak-tflops",
        type=float,
        help="the device's dense peak TFLOP/s for MFU (detected for A100/H100)",
    )
    a("--dropout", type=float, default=0.0, help="dropout probability")
    a("--seed", type=int, default=1337, help="seed for init, data order and sampling")
    a("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """Validate every combination before any data or model is touched."""
    if args.max_tokens is not None:
        if args.max_tokens < 1:
            raise SystemExit("error: --max-tokens must be >= 1")
        args.max_steps = steps_for_tokens(args)
    preset = PRESETS[args.preset]
    resume_path = Path(args.resume) if args.resume and args.resume != "auto" else None
    cuda = (args.device or "").startswith("cuda") or (args.device is None and _cuda_available())
    checks = [
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.grad_accum >= 1, "--grad-accum must be >= 1"),
        (args.max_steps >= 1, "--max-steps must be >= 1"),
        (args.lr > 0, "--lr must be > 0"),
        (0 <= args.warmup_steps < args.max_steps, "--warmup-steps must be in [0, --max-steps)"),
        (0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (
            min(args.eval_every, args.save_every, args.sample_every) >= 0,
            "--eval/save/sample-every must be >= 0",
        ),
        (args.save_total_limit >= 1, "--save-total-limit must be >= 1"),
        (
            args.zero_stage is None or args.mode == "deepspeed",
            "--zero-stage needs --mode deepspeed",
        ),
        (
            args.mode != "deepspeed" or importlib.util.find_spec("deepspeed") is not None,
            "--mode deepspeed needs the deepspeed package (see HOW_TO_USE.md, 'Modes')",
        ),
        (
            not (args.mode == "deepspeed" and args.compile),
            "--compile is not supported with --mode deepspeed",
        ),
        (
            args.time_limit is None or args.time_limit > 30,
            "--time-limit must leave more than the 30 s reserved for saving and export",
        ),
        (
            args.block_size is None or args.block_size <= preset.n_positions,
            f"--block-size exceeds the {args.preset} context of {preset.n_positions}",
        ),
        (
            args.vocab_size is None or args.vocab_size >= 257,
            "--vocab-size must be at least 257 (bytes + EOS)",
        ),
        (
            args.tokenizer is None or args.vocab_size is None,
            "--tokenizer and --vocab-size exclude each other",
        ),
        (
            not (args.resume and (args.tokenizer or args.vocab_size)),
            "--resume takes the tokenizer from the checkpoint: drop --tokenizer/--vocab-size",
        ),
        (
            resume_path is None or (resume_path / "state.pt").is_file(),
            f"--resume {resume_path}: not a training-state checkpoint (expected {resume_path}/state.pt)",
        ),
        (not args.fp16 or cuda, "--fp16 needs a CUDA device; use --bf16 on CPU"),
        (
            args.optimizer == "adamw" or args.mode == "baseline",
            "--optimizer muon works in --mode baseline (one process or DDP); use adamw with fsdp/deepspeed",
        ),
        (
            args.report_to != "tensorboard" or importlib.util.find_spec("tensorboard") is not None,
            "--report-to tensorboard needs the tensorboard package (pip install tensorboard)",
        ),
    ]
    errors = [msg for ok, msg in checks if not ok]
    if errors:
        raise SystemExit("error: " + "; ".join(errors))
    return TrainingConfig(
        mode=args.mode,
        streaming=args.streaming,
        zero_stage=args.zero_stage or 2,
        preset=args.preset,
        data=args.data,
        output_dir=args.output_dir,
        run_name=args.run_name,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        block_size=args.block_size,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        scheduler=args.scheduler,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        time_limit_s=args.time_limit,
        eval_every=args.eval_every,
        dropout=args.dropout,
        seed=args.seed,
        num_threads=args.threads,
        progress=not args.no_progress,
        device=args.device,
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        gradient_checkpointing=args.gradient_checkpointing,
        compile=args.compile,
        resume=args.resume,
        save_every=args.save_every,
        save_total_limit=args.save_total_limit,
        sample_every=args.sample_every,
        report_to=args.report_to,
        cache_dir=None if args.cache_dir == "none" else Path(args.cache_dir),
        peak_tflops=args.peak_tflops,
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(build_parser().parse_args(argv))
    from lib.training import train  # heavy imports only after the arguments are valid
    from lib.training.loop import NonFiniteLoss

    try:
        result = train(config)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.stop_reason != "max_steps":
        print(
            f"stopped early ({result.stop_reason}); resume with: --output-dir {config.output_dir} --resume auto"
        )
    return 0


def exit_now(code: int) -> None:
    """Flush and leave without the interpreter's teardown. After a complete run (checkpoint
    written, process group destroyed), objects that still hold gloo's process group (FSDP's and
    DeepSpeed's) are destroyed during interpreter finalisation, where gloo's worker threads can
    abort the process ("terminate called without an active exception", SIGABRT): 3 of 35
    two-process ZeRO-3 runs on two busy cores did, each after "main returned" on both ranks.
    torchrun then reports the whole run as failed."""
    import logging
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
