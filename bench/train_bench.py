#!/usr/bin/env python
"""Training throughput: our training step (lib.training) against a minimal plain-PyTorch loop.

Same model, same batches, same optimizer settings; the two loops alternate in rounds so drift of
the machine hits both. Prints tokens/s (and MFU when the device's peak is known or given) and,
with --write, appends the table to BENCHMARKS.md.

    python bench/train_bench.py --preset tiny --batch-size 8 --steps 20 --rounds 3 --write
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.modeling import build_model  # noqa: E402
from lib.presets import get_preset  # noqa: E402
from lib.training.callbacks import flops_per_token, peak_flops  # noqa: E402
from lib.training.config import TrainingConfig  # noqa: E402
from lib.training.loop import train_step  # noqa: E402
from lib.training.setup import build_training_artifacts  # noqa: E402


def plain_loop_tokens_per_s(model, batches, lr: float) -> float:
    """The minimal loop a user would write by hand."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    t = time.perf_counter()
    for b in batches:
        logits = model(input_ids=b[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return sum(b[:, 1:].numel() for b in batches) / (time.perf_counter() - t)


def ours_tokens_per_s(artifacts, batches) -> float:
    scaler = torch.amp.GradScaler(artifacts.device.type, enabled=False)
    t = time.perf_counter()
    for b in batches:
        train_step(artifacts, [b], scaler)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return sum(b[:, 1:].numel() for b in batches) / (time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps per loop per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (detected on A100/H100)")
    p.add_argument("--write", action="store_true", help="append the result to BENCHMARKS.md")
    args = p.parse_args()

    preset = get_preset(args.preset)
    cfg = TrainingConfig(
        preset=args.preset,
        batch_size=args.batch_size,
        max_steps=10**9,
        warmup_steps=0,
        progress=False,
        output_dir=Path("runs/bench"),
    )
    ours = build_training_artifacts(cfg)
    vocab = ours.model.config.vocab_size
    plain = build_model(preset, vocab_size=vocab, seed=cfg.seed).to(ours.device)
    train_blocks = ours.data.train
    gen = torch.Generator().manual_seed(0)
    batches = [
        train_blocks.batch(torch.randint(len(train_blocks), (args.batch_size,), generator=gen)).to(
            ours.device
        )
        for _ in range(args.steps)
    ]
    block = train_blocks.block_size
    ours_tokens_per_s(ours, batches[:2])  # warm-up
    plain_loop_tokens_per_s(plain, batches[:2], cfg.lr)
    ours_runs, plain_runs = [], []
    for _ in range(args.rounds):
        ours_runs.append(ours_tokens_per_s(ours, batches))
        plain_runs.append(plain_loop_tokens_per_s(plain, batches, cfg.lr))
    n = (
        sum(p.numel() for p in {id(p): p for p in plain.parameters()}.values())
        - plain.transformer.wpe.weight.numel()
    )
    fpt = flops_per_token(n, preset.n_layer, preset.n_head, preset.head_dim, block)
    peak = peak_flops(ours.device, args.peak_tflops)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    device = (
        torch.cuda.get_device_name()
        if ours.device.type == "cuda"
        else (f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    )
    rows = []
    for name, runs in (("lib.training (ours)", ours_runs), ("plain PyTorch loop", plain_runs)):
        mfu = f"{med(runs) * fpt / peak:.1%}" if peak else "n/a"
        rows.append(
            f"| {name} | {med(runs):,.0f} | {', '.join(f'{r:,.0f}' for r in runs)} | {mfu} |"
        )
    table = "\n".join(
        [
            f"### Training step, preset `{args.preset}`, batch {args.batch_size} x {block}, fp32, {device}",
            "",
            f"Command: `python bench/train_bench.py --preset {args.preset} --batch-size {args.batch_size} "
            f"--steps {args.steps} --rounds {args.rounds}`  ",
            f"FLOPs/token (6N + 12·L·H·Q·T): {fpt / 1e6:.1f} M; ours/plain median ratio: "
            f"{med(ours_runs) / med(plain_runs):.3f}",
            "",
            "| loop | tokens/s (median) | tokens/s per round | MFU |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )
    print(table)
    if args.write:
        path = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
        if not path.exists():
            path.write_text(
                "# Benchmarks\n\nMeasured with the commands shown; numbers are from the machine named in each heading.\n\n"
            )
        with path.open("a", encoding="utf-8") as f:
            f.write("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
