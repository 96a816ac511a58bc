#!/usr/bin/env python
"""Training step speed by memory allocator: glibc as it comes, glibc keeping freed memory
(`lib.allocator.keep_freed_memory`, what training does), and tcmalloc preloaded where installed.

An allocator setting lasts for the process, so each configuration runs in a fresh interpreter;
rounds alternate them so drift of the machine hits all of them. Each child times an element-wise
operation on a fresh 1024 × 8,192 tensor (the shape of a step's logits) and a training step of
`tiny` at width 128 with its 8,192-token vocabulary (fp32, our Muon) at batch 4 × 256 and 16 × 64.

    python bench/allocator_bench.py --steps 15 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TCMALLOC = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)
SHAPES = ((4, 256), (16, 64))


def child(steps: int, keep: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.precision_bench import step_setup
    from lib.allocator import keep_freed_memory

    kept = keep_freed_memory() if keep else False
    x = torch.randn(1024, 8192)
    x.exp()
    t = time.perf_counter()
    for _ in range(20):
        x.exp()
    out = {"kept": kept, "exp_ms": (time.perf_counter() - t) / 20 * 1e3}
    for batch, block in SHAPES:
        step = step_setup(False, False, batch, block)
        for _ in range(3):
            step()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        out[f"{batch}x{block}"] = batch * block * steps / (time.perf_counter() - t)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15, help="timed steps per shape per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=("default", "kept"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.child == "kept")))
        return 0
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    configs = {
        "glibc malloc as it comes": ("default", base),
        "glibc malloc keeping freed memory (training's)": ("kept", base),
    }
    tcmalloc = next((t for t in TCMALLOC if Path(t).exists()), None)
    if tcmalloc:
        configs["tcmalloc (LD_PRELOAD)"] = ("default", {**base, "LD_PRELOAD": tcmalloc})
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (mode, env) in configs.items():
            done = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
                env=env,
                cwd=ROOT,
            )
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    shapes = [f"{b}x{t}" for b, t in SHAPES]
    print(f"{args.steps} steps per shape × {args.rounds} rounds; tokens/s, median of the rounds")
    head = " | ".join(f"step {s.replace('x', ' × ')}" for s in shapes)
    print(f"| allocator | exp of 1024 × 8,192 (ms) | {head} |")
    print("| --- | --- |" + " --- |" * len(shapes))

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    for name, runs in results.items():
        cells = [f"{median([r[s] for r in runs]):,.0f}" for s in shapes]
        print(f"| {name} | {median([r['exp_ms'] for r in runs]):.1f} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
