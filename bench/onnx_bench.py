"""PyTorch against ONNX Runtime fp32 and int8: the engine alone and through HTTP, at 1, 16 and 64
clients, with each one's bits/byte, for the default model and a gpt2-124m-sized checkpoint.

    python bench/onnx_bench.py                  # both models (make bench-onnx)
    python bench/onnx_bench.py --models default --write BENCHMARKS.md

Each checkpoint is copied to runs/bench/onnx-<name> (models/ stays as shipped) and exported there
with `lib.export_onnx --int8` when it has no export yet; the card's parity and bits/byte figures
go into the table. The engine-alone rows run `bench/engine_bench.py`'s closed loop in this process
(every backend with the same math threads); the HTTP rows run `bench/serve_bench.py` with systems
`ours`, `ours-onnx` and `ours-onnx-int8` (the engine in its own process, streamed off) and read
its JSON. Run nothing else meanwhile: the two cores are the measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_bench import run as engine_run  # noqa: E402
from lib.export_onnx import CARD_FILE  # noqa: E402
from lib.inference import InferenceService  # noqa: E402
from lib.presets import DEFAULT_CHECKPOINT  # noqa: E402

MODELS = {
    "default": DEFAULT_CHECKPOINT,
    "gpt2-124m": ROOT / "runs" / "bench" / "random-gpt2-124m",  # bench/random_checkpoint.py
}
BACKENDS = (("torch", "fp32", "ours"), ("onnxruntime", "fp32", "ours-onnx"))
BACKENDS += (("onnxruntime", "int8", "ours-onnx-int8"),)
START, END = "<!-- onnx_bench:start -->", "<!-- onnx_bench:end -->"


def prepared(name: str, source: Path) -> Path:
    """A copy of `source` with its ONNX export (made once)."""
    if name == "gpt2-124m" and not (source / "config.json").exists():
        subprocess.run(
            [
                sys.executable,
                "bench/random_checkpoint.py",
                "--preset",
                "gpt2-124m",
                "--out",
                str(source),
            ],
            cwd=ROOT,
            check=True,
        )
    copy = ROOT / "runs" / "bench" / f"onnx-{name}"
    if not (copy / "config.json").exists():
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("onnx"))
    if not (copy / "onnx" / CARD_FILE).exists():  # in a process of its own: its torch threads
        # would otherwise leave an OpenMP pool here that slows the engine down (engine.py)
        cmd = [sys.executable, "-m", "lib.export_onnx", str(copy), "--int8"]
        subprocess.run([*cmd, "--eval-documents", "200"], cwd=ROOT, check=True)
    return copy


def engine_rows(checkpoint: Path, clients: list[int], per_caller: int, threads: int) -> dict:
    rows = {}
    for backend, precision, system in BACKENDS:
        torch.set_num_threads(1)
        service = InferenceService.from_checkpoint(
            checkpoint,
            backend=backend,
            quantization="int8" if precision == "int8" else "none",
            threads=threads,
        )
        for n in clients:
            tps, _ = asyncio.run(engine_run(service, n, 64, per_caller, 64, threads))
            rows[(system, n)] = tps
            print(f"engine {system} {n}: {tps:,.0f} tok/s", flush=True)
    return rows


def http_rows(checkpoint: Path, clients: list[int], per_client: int, min_requests: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "serve.json"
        cmd = [sys.executable, "bench/serve_bench.py", "--checkpoint", str(checkpoint)]
        cmd += ["--systems", *(s for *_, s in BACKENDS), "--json", str(out)]
        cmd += ["--concurrency", *map(str, clients), "--requests-per-client", str(per_client)]
        cmd += ["--min-requests", str(min_requests)]
        subprocess.run(cmd, cwd=ROOT, check=True)
        summaries = json.loads(out.read_text())
    return {(s["system"], s["load"]): s for s in summaries if s.get("load") in clients}


def section(results: dict, clients: list[int], threads: int) -> str:
    lines = [
        START,
        f"`python bench/onnx_bench.py` ({platform.machine()}, {threads} threads, torch "
        f"{torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}): 64 new "
        "tokens per request, sampled with a seed, continuous batching up to 64 rows. Engine "
        "alone: `bench/engine_bench.py`'s closed loop in one process. HTTP: `bench/serve_bench.py`"
        " (not streamed), the engine in its own process. Bits/byte: the export card's, on the "
        "checkpoint's held-out documents (each scored alone).",
        "",
    ]
    for name, r in results.items():
        card = r["card"]
        q, p = card["bits_per_byte"], card["parity"]
        lines += [
            f"**{name}** ({card['source']['name']}; parity fp32: max |logit diff| "
            f"{p['max_abs_logit_difference']:.2g}, greedy identical {p['greedy_identical']}; "
            f"int8 greedy identical to fp32: {card['int8']['greedy_identical_to_fp32']})",
            "",
            "| backend | bits/byte | "
            + " | ".join(f"engine tok/s, {n}" for n in clients)
            + " | "
            + " | ".join(f"HTTP tok/s, {n}" for n in clients)
            + " | HTTP p50 latency, 1 client (s) |",
            "| --- " * (3 + 2 * len(clients)) + "|",
        ]
        for backend, precision, system in BACKENDS:
            bpb = q["torch_fp32" if backend == "torch" else f"onnx_{precision}"]
            engine = [f"{r['engine'][(system, n)]:,.0f}" for n in clients]
            http = [r["http"].get((system, n)) for n in clients]
            http_tps = [f"{h['tok_s']:,.0f}" if h else "–" for h in http]
            one = r["http"].get((system, clients[0]))
            label = "PyTorch (ours)" if backend == "torch" else f"ONNX Runtime {precision}"
            lines.append(
                f"| {label} | {bpb} | {' | '.join(engine)} | {' | '.join(http_tps)} | "
                f"{one['lat_p50']:.2f} |"
                if one
                else f"| {label} | {bpb} | {' | '.join(engine)} | {' | '.join(http_tps)} | – |"
            )
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    doc = path.read_text(encoding="utf-8")
    if START in doc and END in doc:
        doc = doc[: doc.index(START)] + text + doc[doc.index(END) + len(END) :]
    else:
        doc = doc.rstrip("\n") + "\n\n### ONNX Runtime against PyTorch (measured)\n\n" + text + "\n"
    path.write_text(doc, encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--write", type=Path, help="replace the ONNX section of this markdown file")
    args = p.parse_args()
    threads = torch.get_num_threads()
    results = {}
    for name in args.models:
        checkpoint = prepared(name, MODELS[name])
        small = name == "default"
        per = args.requests_per_client if small else 1  # gpt2-124m: ~25 tok/s per client alone
        engine = engine_rows(checkpoint, args.concurrency, per, threads)
        http = http_rows(checkpoint, args.concurrency, per, 16 if small else 4)
        card = json.loads((checkpoint / "onnx" / CARD_FILE).read_text())
        results[name] = {"engine": engine, "http": http, "card": card}
    text = section(results, args.concurrency, threads)
    print(text)
    if args.write:
        write(args.write, text)


if __name__ == "__main__":
    main()
