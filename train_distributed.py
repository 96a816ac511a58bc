#!/usr/bin/env python
"""Train a GPT-2-family model from scratch and export a Hugging Face-format checkpoint.

    python train_distributed.py --preset tiny --max-steps 900 --output-dir runs/baseline

The checkpoint lands in OUTPUT_DIR/final; serve it with `make serve-trained CHECKPOINT=OUTPUT_DIR/final`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from lib.config import PRESETS, TrainingConfig
from lib.training.schedulers import SCHEDULES

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """'3h30m', '90m', '45s' or plain seconds -> seconds."""
    m = _DURATION.match(text.strip())
    if not text.strip() or not m or not any(m.groups()):
        raise argparse.ArgumentTypeError(f"bad duration {text!r}; use e.g. 3h30m, 90m, 600s or 600")
    h, mnt, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mnt * 60 + s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--mode",
        choices=["baseline"],
        default="baseline",
        help="training mode: baseline = one process (CPU or one GPU)",
    )
    p.add_argument(
        "--preset", choices=list(PRESETS), default="tiny", help="model size (lib/config.py)"
    )
    p.add_argument(
        "--data",
        default="bundled",
        help="'bundled' (Russian corpus), a .txt/.jsonl file or directory, or a `datasets` name",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("runs/baseline"),
        help="run directory; the checkpoint is written to OUTPUT_DIR/final",
    )
    p.add_argument(
        "--run-name", help="model id recorded in the checkpoint (default: the output dir's name)"
    )
    p.add_argument("--tokenizer", help="existing tokenizer directory (default: train a new BPE)")
    p.add_argument(
        "--vocab-size",
        type=int,
        help="vocabulary of a newly trained tokenizer (default: the preset's)",
    )
    p.add_argument("--block-size", type=int, help="training context length (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument(
        "--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak"
    )
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on weight matrices")
    p.add_argument(
        "--scheduler", choices=SCHEDULES, default="cosine", help="LR schedule after warm-up"
    )
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--max-steps", type=int, default=900, help="optimizer steps")
    p.add_argument(
        "--time-limit",
        type=parse_duration,
        help="wall-clock budget (e.g. 3h30m, 11m): stop and export when spent",
    )
    p.add_argument(
        "--eval-every", type=int, default=150, help="validation every N steps (0: only at the end)"
    )
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability")
    p.add_argument("--seed", type=int, default=1337, help="seed for init, data order and sampling")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    checks = [
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.grad_accum >= 1, "--grad-accum must be >= 1"),
        (args.max_steps >= 1, "--max-steps must be >= 1"),
        (args.lr > 0, "--lr must be > 0"),
        (0 <= args.warmup_steps < args.max_steps, "--warmup-steps must be in [0, --max-steps)"),
        (0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (
            args.block_size is None or args.block_size <= PRESETS[args.preset].n_positions,
            f"--block-size exceeds the {args.preset} context of {PRESETS[args.preset].n_positions}",
        ),
        (
            args.vocab_size is None or args.vocab_size >= 256 + 1,
            "--vocab-size must be at least 257 (bytes + EOS)",
        ),
        (
            args.tokenizer is None or args.vocab_size is None,
            "--tokenizer and --vocab-size exclude each other",
        ),
    ]
    errors = [msg for ok, msg in checks if not ok]
    if errors:
        raise SystemExit("error: " + "; ".join(errors))
    return TrainingConfig(
        preset=args.preset,
        data=args.data,
        output_dir=args.output_dir,
        run_name=args.run_name,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        block_size=args.block_size,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
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
    )


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(build_parser().parse_args(argv))
    from lib.training import train  # heavy imports only after the arguments are valid

    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
