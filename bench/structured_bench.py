"""Structured outputs in the engine (issue 33): tokens/s of `GenerationEngine` with and without a
constraint, at 1 and 16 rows, and what one constrained row costs the 15 free rows beside it.

No HTTP: callers submit to the engine directly (bench/engine_bench.py's way), each sending its
requests one after another, every request asking for the same number of new tokens. The
constraints never complete within that budget, so a constrained request generates exactly as many
tokens as a free one (min_new_tokens holds a free one's end off), and the figures compare equal
work:

- `regex`: 1,000 characters of Cyrillic letters, spaces, commas and full stops;
- `json`: a JSON object whose one string field has at least 1,000 characters (the JSON grammar,
  its string lexer, its escapes).

Isolation: 16 rows, 15 of them free; the 16th sends constrained (or, for the baseline, free)
requests for as long as the 15 run. The figure is the 15 free rows' tokens/s, and beside it what
the constrained row adds to a step (the free rows' time per token, against the baseline's) and
the mask work of that row: the time the step spends in `DecodeBatch._mask` and the matchers'
`consume`, timed in this process.

Steps: the same comparison without the engine's thread hand-offs and callers, so with less noise
from a shared machine: a `DecodeBatch` of 16 rows (all free, 15 free and 1 constrained, all
constrained) stepped directly, the median time of a decode step over alternating repeats.

    python bench/structured_bench.py
    python bench/structured_bench.py --checkpoint models/default runs/bench/random-gpt2-124m-vocab4k
    python bench/structured_bench.py --write BENCHMARKS.md   # also rewrites its section there

A gpt2-124m-sized checkpoint: `python bench/random_checkpoint.py --preset gpt2-124m
--tokenizer-vocab` (4,096-token head), or without `--tokenizer-vocab` (GPT-2's 50,257-wide head:
the mask is 50,257 wide, ids past the tokenizer's are never allowed).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sections import replace_marked  # noqa: E402
from lib.inference import GenerationParams, InferenceService, generation  # noqa: E402
from lib.inference.constraints import Constraint, RowMatcher  # noqa: E402
from lib.inference.limits import default_math_threads  # noqa: E402
from lib.inference.quantization import served_parameters  # noqa: E402
from lib.presets import DEFAULT_CHECKPOINT  # noqa: E402

PROMPT = "Привет, мир! Как дела у тебя сегодня? Расскажи мне что-нибудь интересное про Москву."
CONSTRAINTS = {
    "none": None,
    "regex": Constraint.regex("[а-яё ,.]{1000}"),
    "json": Constraint.json_schema(
        {
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 1000}},
            "required": ["text"],
        }
    ),
}


class MaskClock:
    """The time spent in the grammar's work of a step (`DecodeBatch._mask`, `RowMatcher.consume`),
    summed while `on`: this bench's own wrappers around them."""

    def __init__(self):
        self.seconds, self.steps, self.on = 0.0, 0, False
        mask, consume = generation.DecodeBatch._mask, RowMatcher.consume
        clock = self

        def timed_mask(batch, *args):
            t0 = time.perf_counter()
            try:
                return mask(batch, *args)
            finally:
                if clock.on:
                    clock.seconds += time.perf_counter() - t0
                    clock.steps += 1

        def timed_consume(matcher, token):
            t0 = time.perf_counter()
            try:
                return consume(matcher, token)
            finally:
                if clock.on:
                    clock.seconds += time.perf_counter() - t0

        generation.DecodeBatch._mask = timed_mask
        RowMatcher.consume = timed_consume

    def start(self) -> None:
        self.seconds, self.steps, self.on = 0.0, 0, True

    def per_step_ms(self) -> float:
        self.on = False
        return 1e3 * self.seconds / max(self.steps, 1)


CLOCK = MaskClock()
START, END = "<!-- structured_bench:start -->", "<!-- structured_bench:end -->"


def params(kind: str, new_tokens: int, seed: int) -> GenerationParams:
    return GenerationParams(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        temperature=0.8,
        seed=seed,
        constraint=CONSTRAINTS[kind],
    )


async def throughput(engine, service, kinds: list[str], per_caller: int, new_tokens: int):
    """tokens/s of callers k (kinds[k] their constraint), each sending `per_caller` requests."""
    tokens = 0

    async def caller(k: int) -> None:
        nonlocal tokens
        for i in range(per_caller):
            p = params(kinds[k], new_tokens, seed=k * 1000 + i)
            result = await engine.submit(service.prepare(PROMPT, p))
            assert result.completion_tokens == new_tokens, result  # equal work, every row
            tokens += result.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(len(kinds))))
    return tokens / (time.perf_counter() - t0)


async def beside(engine, service, other: str, per_caller: int, new_tokens: int) -> float:
    """tokens/s of 15 free callers while a 16th sends `other` requests until they are done."""
    done = asyncio.Event()
    tokens = 0

    async def free(k: int) -> None:
        nonlocal tokens
        for i in range(per_caller):
            p = params("none", new_tokens, seed=k * 1000 + i)
            result = await engine.submit(service.prepare(PROMPT, p))
            tokens += result.completion_tokens

    async def neighbour() -> None:
        i = 0
        while not done.is_set():
            await engine.submit(service.prepare(PROMPT, params(other, new_tokens, 99_000 + i)))
            i += 1

    side = asyncio.ensure_future(neighbour())
    await asyncio.sleep(0)
    CLOCK.start()
    t0 = time.perf_counter()
    await asyncio.gather(*(free(k) for k in range(15)))
    elapsed = time.perf_counter() - t0
    mask_ms = CLOCK.per_step_ms()
    done.set()
    await side
    return tokens / elapsed, mask_ms


def measure(service, args) -> list[dict]:
    """One row per (rows, constraint) and per isolation baseline, each the median of repeats
    (the kinds alternate within a repeat, so a busy moment of the machine hits them alike)."""
    out = []

    async def all_runs():
        engine = service.create_engine(max_batch_size=16, threads=args.threads)
        engine.start()
        try:
            await engine.submit(service.prepare(PROMPT, params("json", 4, 0)))  # compile, warm
            figures: dict[tuple, list[float]] = {}
            for _ in range(args.repeats):
                for rows in args.rows:
                    for kind in CONSTRAINTS:
                        tps = await throughput(
                            engine, service, [kind] * rows, args.requests_per_caller, args.tokens
                        )
                        figures.setdefault((f"{rows} rows", kind), []).append(tps)
                for other in ("none", "regex", "json"):
                    tps, mask_ms = await beside(
                        engine, service, other, args.requests_per_caller, args.tokens
                    )
                    figures.setdefault(("15 free + 1", other), []).append(tps)
                    figures.setdefault(("mask ms", other), []).append(mask_ms)
            return figures
        finally:
            engine.stop()

    figures = asyncio.run(all_runs())
    for (what, kind), values in figures.items():
        if what == "mask ms":
            continue
        row = {"what": what, "constraint": kind, "tok_s": statistics.median(values)}
        if what.startswith("15"):
            row["mask_ms"] = statistics.median(figures[("mask ms", kind)])
        out.append(row)
    return out


MIXES = {  # 16 rows: what the last rows are constrained with
    "16 free": ("none", 0),
    "15 free + 1 regex": ("regex", 1),
    "15 free + 1 json": ("json", 1),
    "16 regex": ("regex", 16),
    "16 json": ("json", 16),
}


def step_times(service, repeats: int, threads: int | None, steps: int = 40) -> dict[str, float]:
    """Median ms of one decode step of a 16-row `DecodeBatch` for each of MIXES (alternating),
    in one thread of its own with the engine's thread count (see lib/inference/engine.py)."""
    import torch

    ids = service.prepare(PROMPT, GenerationParams()).ids

    def one(mix: str) -> float:
        kind, constrained = MIXES[mix]
        batch = generation.DecodeBatch(service.model, service.tokenizer, 16)
        batch.admit(
            [
                generation.GenerationRequest(
                    ids, params(kind if i >= 16 - constrained else "none", steps + 8, seed=i)
                )
                for i in range(16)
            ]
        )
        for _ in range(2):
            batch.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            batch.step()
        return 1e3 * (time.perf_counter() - t0) / steps

    def run() -> dict[str, float]:
        torch.set_num_threads(threads or default_math_threads(served_parameters(service.model)))
        found: dict[str, list[float]] = {m: [] for m in MIXES}
        for _ in range(repeats):
            for mix in MIXES:
                found[mix].append(one(mix))
        return {m: statistics.median(v) for m, v in found.items()}

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


def step_table(steps: dict[str, dict[str, float]]) -> str:
    lines = [
        "| checkpoint | 16 rows | decode step (ms) | vs all free |",
        "| --- | --- | --- | --- |",
    ]
    for name, found in steps.items():
        for mix, ms in found.items():
            lines.append(f"| {name} | {mix} | {ms:.2f} | {ms / found['16 free']:.3f} |")
    return "\n".join(lines)


def table(results: dict[str, list[dict]]) -> str:
    """Throughput at 1 and 16 rows, then the isolation rows: the 15 free rows' tok/s, the time
    per step the 16th row's constraint added to them, and that row's own mask work per step."""
    lines = [
        "| checkpoint | rows | constraint | tok/s | vs free | step time added (ms) "
        "| mask work of the row (ms/step) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rows in results.items():
        base = {r["what"]: r["tok_s"] for r in rows if r["constraint"] == "none"}
        for r in rows:
            ratio = r["tok_s"] / base[r["what"]]
            what, added, mask = r["what"], "", ""
            if what.startswith("15"):  # 15 rows' tokens per step: time per step = 15 / tok/s
                what = "15 free + 1 (the free rows' tok/s)"
                if r["constraint"] != "none":
                    added = f"{1e3 * 15 * (1 / r['tok_s'] - 1 / base[r['what']]):.3f}"
                    mask = f"{r['mask_ms']:.3f}"
            lines.append(
                f"| {name} | {what} | {r['constraint']} | {r['tok_s']:.0f} | {ratio:.2f} "
                f"| {added} | {mask} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", nargs="+", default=[str(DEFAULT_CHECKPOINT)])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--requests-per-caller", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: by size)")
    p.add_argument("--write", type=Path, help="rewrite this file's structured_bench section")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    results, steps = {}, {}
    for checkpoint in args.checkpoint:
        service = InferenceService.from_checkpoint(checkpoint, device="cpu")
        vocab = service.vocab_size
        threads = args.threads or default_math_threads(served_parameters(service.model))
        name = (
            f"{Path(checkpoint).name} ({service.metadata()['parameters'] / 1e6:.1f}M, "
            f"vocab {vocab}, {threads} threads)"
        )
        results[name] = measure(service, args)
        print(table({name: results[name]}), flush=True)
        steps[name] = step_times(service, args.repeats, args.threads)
        print(step_table({name: steps[name]}), flush=True)
    load_after = os.getloadavg()
    command = "python bench/structured_bench.py " + " ".join(argv or sys.argv[1:])
    section = "\n".join(
        [
            START,
            f"Command: `{command.strip()}` ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores; load average {load_before[0]:.1f} before, "
            f"{load_after[0]:.1f} after; {date.today()}). Each figure is the median of "
            f"{args.repeats} runs; every request generates {args.tokens} tokens. The engine alone: "
            "no HTTP, no response cache, the prefix cache off.",
            "",
            table(results),
            "",
            "The same mixes, as the time of one decode step of a 16-row batch (stepped directly, "
            "median of the repeats):",
            "",
            step_table(steps),
            END,
        ]
    )
    print(section)
    if args.write:
        text = args.write.read_text()
        new = replace_marked(text, section, START, END)
        if new is None:
            new = text.rstrip("\n") + "\n\n## Structured outputs\n\n" + section + "\n"
        args.write.write_text(new)


if __name__ == "__main__":
    main()
