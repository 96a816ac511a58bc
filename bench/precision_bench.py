#!/usr/bin/env python
"""Training step speed by precision and by where Muon's Newton-Schulz iteration runs.

On a CPU without native bfloat16 (no AVX-512 BF16, no AMX), bf16 arithmetic is emulated. This
measures what that costs: a 1024² matrix product in fp32 and in bf16, then a training step of the
`make train-baseline` model (`tiny` at width 128, batch 8 × 128, Muon + AdamW) with
  - fp32, torch.optim.Muon (Newton-Schulz in bf16 always),
  - fp32, our Muon (`lib.training.optim.Muon`: bf16 only where native, else fp32),
  - bf16 autocast, our Muon.
Rounds alternate the configurations so drift of the machine hits all of them.

    python bench/precision_bench.py --steps 10 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.modeling import build_model  # noqa: E402
from lib.presets import PRESETS  # noqa: E402
from lib.training.config import native_bf16  # noqa: E402
from lib.training.loop import accumulate_gradients  # noqa: E402
from lib.training.optim import build_optimizer, split_parameters  # noqa: E402


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        done += 1
    return done * 2 * n**3 / (time.perf_counter() - t) / 1e9


def step_setup(torch_muon: bool, bf16: bool, batch: int, block: int):
    preset = dataclasses.replace(PRESETS["tiny"], n_embd=128)
    model = build_model(preset, vocab_size=preset.vocab_size, dropout=0.0, seed=0)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.1, name="muon")
    if torch_muon:  # the same groups under torch's own class
        matrices, _ = split_parameters(model)
        opt.muon = torch.optim.Muon(
            matrices, lr=3e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"
        )
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    )
    data = torch.randint(0, preset.vocab_size, (batch, block + 1), generator=torch.Generator())

    def step() -> None:
        accumulate_gradients(model, [data], autocast)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cpu = platform.processor() or platform.machine()
    print(
        f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16('cpu')}"
    )
    print(f"1024² matmul: fp32 {matmul_gflops(torch.float32):.1f} GFLOP/s, ", end="", flush=True)
    print(f"bf16 {matmul_gflops(torch.bfloat16):.1f} GFLOP/s")
    configs = {
        "fp32, torch.optim.Muon (NS in bf16)": step_setup(
            True, False, args.batch_size, args.block_size
        ),
        "fp32, our Muon": step_setup(False, False, args.batch_size, args.block_size),
        "bf16 autocast, our Muon": step_setup(False, True, args.batch_size, args.block_size),
    }
    tokens = args.batch_size * args.block_size * args.steps
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, step in configs.items():
            step()  # warm-up
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(tokens / (time.perf_counter() - t))
    print(
        f"\nbatch {args.batch_size} × {args.block_size}, {args.steps} steps × {args.rounds} rounds"
    )
    print("| configuration | tokens/s (median) | per round |\n| --- | --- | --- |")
    for name, r in rates.items():
        per_round = ", ".join(f"{x:,.0f}" for x in r)
        print(f"| {name} | {sorted(r)[len(r) // 2]:,.0f} | {per_round} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
