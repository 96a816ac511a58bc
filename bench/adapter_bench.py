"""Many LoRA adapters in one batch: throughput of a mixed-adapter batch against a base-only one.

The engine (`GenerationEngine`, in this process, no HTTP) runs a checkpoint with three LoRA
adapters loaded (PEFT directories made here with peft itself: rank `--rank` on c_attn, c_proj and
c_fc, random weights, which cost what trained ones cost). `--clients` closed-loop callers each send
`--requests` requests one after another (`--max-new-tokens` new tokens, `ignore_eos`, sampled at
the service's defaults), in three workloads, interleaved `--repeats` times:

- `base`: every request on the base model;
- `mixed`: requests spread over the base model and the three adapters, round robin;
- `adapters`: every request on one of the three adapters;
- `base, none loaded`: `base` on an engine with no adapter loaded (while any is loaded, every
  row's MLP runs its GELU after its product instead of fused into it: decoder.unfused_mlp).

Each row gives tokens per second (generated tokens over wall time, the best of the repeats) and
its share of the base-only figure. The adapters' update for a step is two thin products per
block matrix for the whole batch (lib/inference/adapters.py), so the mixed batch should keep most
of the base's throughput (the issue's goal: at least 80 % at 16 clients).

    python bench/adapter_bench.py --checkpoint runs/bench/random-gpt2-124m-vocab4k --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sections import put_in_history  # noqa: E402
from lib.inference import GenerationParams, InferenceService  # noqa: E402
from lib.presets import DEFAULT_CHECKPOINT  # noqa: E402

TITLE = "### 2026-12-07: LoRA adapters: a mixed batch against the base model"
START, END = "<!-- adapter_bench: start -->", "<!-- adapter_bench: end -->"
PROMPTS = ["Привет, мир!", "Москва — столица", "Он открыл дверь и", "В начале было слово"]
ADAPTERS = ("a", "b", "c")


def make_adapters(checkpoint: Path, root: Path, rank: int) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True,
            init_lora_weights=False,
        )
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint), config)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


async def run(engine, service, workload: str, args) -> float:
    params = GenerationParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)

    def adapter_of(c: int, r: int) -> str | None:
        k = c * args.requests + r
        if workload == "base":
            return None
        if workload == "adapters":
            return ADAPTERS[k % 3]
        return (None, *ADAPTERS)[k % 4]

    async def client(c: int) -> int:
        tokens = 0
        for r in range(args.requests):
            p = dataclasses.replace(params, adapter=adapter_of(c, r), seed=c * 1000 + r)
            result = await engine.submit(service.prepare(PROMPTS[(c + r) % 4], p))
            tokens += result.completion_tokens
        return tokens

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(client(c) for c in range(args.clients))))
    return tokens / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="math threads (default: the engine's)")
    p.add_argument("--write", type=Path, help="rewrite this file's adapter section")
    args = p.parse_args(argv)
    service = InferenceService.from_checkpoint(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(args.checkpoint, Path(tmp), args.rank)
        engine = service.create_engine(
            threads=args.threads, adapters=tuple((n, str(p)) for n, p in paths.items())
        )
        engine.start()
        try:
            asyncio.run(
                run(engine, service, "mixed", argparse.Namespace(**{**vars(args), "requests": 1}))
            )
            best = {w: 0.0 for w in ("base", "mixed", "adapters")}
            loads = []
            for _ in range(args.repeats):
                for workload in best:
                    loads.append(os.getloadavg()[0])
                    best[workload] = max(
                        best[workload], asyncio.run(run(engine, service, workload, args))
                    )
                    print(workload, f"{best[workload]:.1f} tok/s", flush=True)
            threads = engine.threads
        finally:
            engine.stop(5)
        plain = service.create_engine(threads=args.threads)
        plain.start()
        try:
            best["base, none loaded"] = max(
                asyncio.run(run(plain, service, "base", args)) for _ in range(args.repeats)
            )
        finally:
            plain.stop(5)
    rows = [
        "| workload | tok/s | of base-only |",
        "| --- | --- | --- |",
        *(f"| {w} | {v:.1f} | {100 * v / best['base']:.0f} % |" for w, v in best.items()),
    ]
    body = "\n".join(rows)
    print(body)
    if args.write:
        head = (
            f"Command: `python bench/adapter_bench.py {' '.join(argv or sys.argv[1:])}` "
            f"({time.strftime('%Y-%m-%d')}; {platform.machine()}, {os.cpu_count()} cores, "
            f"{threads} math threads; `{args.checkpoint}`, three rank-{args.rank} adapters on "
            f"c_attn/c_proj/c_fc; {args.clients} clients x {args.requests} requests of "
            f"{args.max_new_tokens} tokens, best of {args.repeats}; load average "
            f"{min(loads):.1f}-{max(loads):.1f})."
        )
        section = f"{START}\n{head}\n\n{body}\n{END}"
        text = args.write.read_text() if args.write.exists() else ""
        args.write.write_text(put_in_history(text, TITLE, section, START, END))


if __name__ == "__main__":
    main()
