"""The generation engine alone, without HTTP: tokens/s of `GenerationEngine` at N concurrent
callers, with continuous batching (up to 64 rows) and with batch size 1.

It shows what the engine itself gives on this machine, so the serving benchmark's numbers
(bench/serve_bench.py, same model, same 64 new tokens) can be read as engine + HTTP.

    python bench/engine_bench.py                       # prints a markdown table
    python bench/engine_bench.py --concurrency 1 16 64 --requests-per-caller 8
    python bench/engine_bench.py --backend onnxruntime --quantization int8 --batching-only
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time

import torch

from lib.inference import GenerationParams, InferenceService
from lib.presets import DEFAULT_CHECKPOINT

PROMPT = "Привет, мир! Как дела у тебя сегодня? Расскажи мне что-нибудь интересное про Москву."


async def run(
    service, concurrency: int, batch_size: int, per_caller: int, new_tokens: int, threads: int
):
    """(tokens/s, median latency s) for `concurrency` callers, each sending `per_caller`."""
    engine = service.create_engine(max_batch_size=batch_size, threads=threads)
    engine.start()
    latencies: list[float] = []
    tokens = 0

    async def caller(k: int) -> None:
        nonlocal tokens
        for i in range(per_caller):
            params = GenerationParams(
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                temperature=0.8,
                seed=k * 1000 + i,
            )
            t0 = time.perf_counter()
            result = await engine.submit(service.prepare(PROMPT, params))
            latencies.append(time.perf_counter() - t0)
            tokens += result.completion_tokens

    try:
        await caller(-1)  # warm-up
        tokens, latencies = 0, []
        t0 = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(concurrency)))
        return tokens / (time.perf_counter() - t0), statistics.median(latencies)
    finally:
        engine.stop()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--requests-per-caller", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch")
    p.add_argument(
        "--quantization",
        choices=("none", "int8"),
        default="none",
        help="torch's int8 products, or the int8 ONNX file (ML_SERVICE_QUANTIZATION)",
    )
    p.add_argument("--batching-only", action="store_true", help="skip the batch-size-1 runs")
    args = p.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # load in this thread with one: the engine's thread does the math
    service = InferenceService.from_checkpoint(
        args.checkpoint, backend=args.backend, quantization=args.quantization, threads=threads
    )
    runtime = service.runtime()
    print(
        f"{platform.machine()}, {threads} threads, torch {torch.__version__}, "
        f"{runtime['backend']} {runtime['precision']}"
    )
    if args.batching_only:
        print("| callers | tok/s, batching (64 rows) | median latency (s) |")
        print("| --- | --- | --- |")
        for n in args.concurrency:
            tps, lat = asyncio.run(
                run(service, n, 64, args.requests_per_caller, args.max_new_tokens, threads)
            )
            print(f"| {n} | {tps:,.0f} | {lat:.3f} |")
        return
    print(
        "| callers | tok/s, batching (64 rows) | tok/s, batch size 1 | ratio | median latency (s), batching / size 1 |"
    )
    print("| --- | --- | --- | --- | --- |")
    for n in args.concurrency:
        batched, lat_b = asyncio.run(
            run(service, n, 64, args.requests_per_caller, args.max_new_tokens, threads)
        )
        single, lat_s = asyncio.run(
            run(service, n, 1, args.requests_per_caller, args.max_new_tokens, threads)
        )
        print(
            f"| {n} | {batched:,.0f} | {single:,.0f} | {batched / single:.2f}x | {lat_b:.3f} / {lat_s:.3f} |"
        )


if __name__ == "__main__":
    main()
