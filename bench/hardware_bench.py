"""The serving engine's decode step against what this machine allows.

Measures, in this process, the memory bandwidth (a sum over an fp32 array far larger than the
caches: a pure read, as streaming the weights is) and the fp32 matrix-product peak (large square
products, torch's default library and oneDNN, the faster counted), then for decode steps of 1, 16
and 64 rows of a checkpoint (one `DecodeBatch`, as bench/decode_bench.py: 32 new tokens per row at
temperature 0.8 with the service's default top-k/top-p/penalty) prints

- the step time (ms, the mean step of a run, best of `--repeats` runs, variants interleaved),
- the time to read the weights once at the measured bandwidth (every matrix and vector the step
  reads: the parameters without the position embeddings; the tied output projection once),
- their ratio (1.0 would be a step that only streams the weights),
- the step's floating-point work (2 x matrix parameters x rows, plus attention's 4 x rows x keys
  x width per layer) and the rate achieved against the measured peak,
- the time of the step's matrix products alone (every block's four and the output projection,
  bound to the same library and weights as the decoder binds them, on random inputs of the
  step's shapes, same threads) and the step's ratio to it: what the step spends beyond the
  products (attention, norms, sampling, Python),

at each thread count, as a markdown table. `--write BENCHMARKS.md` puts the table into that file's
section "### The decode step against the hardware (gpt2-124m)" (added at the end when missing).

    python bench/random_checkpoint.py --preset gpt2-124m --out runs/bench/random-gpt2-124m
    python bench/hardware_bench.py                               # the table
    python bench/hardware_bench.py --write BENCHMARKS.md
    python bench/hardware_bench.py --no-prepack --rows 16        # oneDNN on the plain weights
    python bench/hardware_bench.py --quantization int8           # int8 products (quantization.py)
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from pathlib import Path

import torch

from lib.inference import InferenceService
from lib.inference.decoder import PREPACK_MIN_ROWS, GPT2SlotDecoder

try:
    from bench.decode_bench import best_of, step_ms
except ImportError:  # run as a script: bench/ itself is on the path
    from decode_bench import best_of, step_ms

DEFAULT = "runs/bench/random-gpt2-124m"
SECTION = "### The decode step against the hardware (gpt2-124m)"
PROMPT_TOKENS = 22  # bench/decode_bench.py's prompt, with its leading end-of-document token


def _best_s(fn, repeats: int) -> float:
    fn()  # warm-up: allocation, library start-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(mib: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth (GB/s): the best of `repeats` sums over an fp32 array of `mib` MiB."""
    a = torch.ones(mib * 2**20 // 4)
    return a.numel() * 4 / _best_s(a.sum, repeats) / 1e9


def matmul_peak(n: int = 2048, repeats: int = 3) -> float:
    """fp32 GFLOP/s of an n x n x n product: the better of torch.mm and oneDNN's linear."""
    from lib.inference.decoder import onednn_linear

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    seconds = _best_s(lambda: torch.mm(x, w), repeats)
    linear = onednn_linear()[0]
    if linear is not None:
        seconds = min(seconds, _best_s(lambda: linear(x, w, None), repeats))
    return 2 * n**3 / seconds / 1e9


def weight_bytes(model) -> int:
    """Bytes a decode step reads of the parameters: all of them but the position embeddings (a
    few rows are read), a tied output projection once."""
    seen, total = set(), 0
    wpe = model.transformer.wpe.weight
    # int8 models keep their matrices in buffers (quantization.Int8Linear)
    for p in (*model.parameters(), *model.buffers()):
        if p.data_ptr() in seen or p is wpe:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def step_flops(model, rows: int, keys: float) -> float:
    """Floating-point operations of one decode step of `rows` rows attending to `keys` cached
    positions on average: 2 per matrix weight per row (blocks and output projection), plus
    q.k and p.v (4 x keys x width per row and layer)."""
    cfg = model.config
    C, inner = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
    matrices = cfg.n_layer * (C * 3 * C + C * C + 2 * C * inner)  # attention in/out, the MLP
    matrices += model.lm_head.weight.numel()
    return 2 * matrices * rows + 4 * rows * keys * cfg.n_embd * cfg.n_layer


def products_ms(service, rows: int, prepack: bool, repeats: int = 30) -> float:
    """Milliseconds for the step's matrix products alone at `rows` rows: each block's four (the
    first MLP product with its activation, as the decoder binds it) and the output projection,
    on random inputs, the best mean of `repeats` rounds."""
    model = service.model
    dec = GPT2SlotDecoder(model, prepack=prepack)
    C = model.config.n_embd
    inner = model.config.n_inner or 4 * C
    x, m = torch.randn(rows, C), torch.randn(rows, inner)

    def once() -> None:
        for b in dec.blocks:
            b.attn(x), b.proj(x), b.mlp_in(x), b.mlp_out(m)
        dec._lm_head(x)

    with torch.inference_mode():
        once()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(repeats):
                once()
            best = min(best, (time.perf_counter() - t0) / repeats)
    return best * 1e3


def measure(args) -> tuple[str, list[dict]]:
    """The header line and one dict per (threads, rows)."""
    service = InferenceService.from_checkpoint(args.checkpoint, quantization=args.quantization)
    model = service.model
    nbytes = weight_bytes(model)
    keys = PROMPT_TOKENS + args.max_new_tokens / 2
    rows_out = []
    header = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        bw = memory_bandwidth(repeats=args.repeats + 2)
        peak = matmul_peak(repeats=args.repeats)
        header.append(f"{threads} thread(s): {bw:.1f} GB/s read, {peak:.0f} GFLOP/s fp32 peak")
        for rows in args.rows:
            (ms,) = best_of(
                args.repeats,
                [rows],
                lambda r: step_ms(
                    service, r, True, args.max_new_tokens, prepack=not args.no_prepack
                ),
            )
            prepack = not args.no_prepack and rows >= PREPACK_MIN_ROWS  # as DecodeBatch does
            alone = min(products_ms(service, rows, prepack) for _ in range(args.repeats))
            stream_ms = nbytes / (bw * 1e9) * 1e3
            flops = step_flops(model, rows, keys)
            rate = flops / (ms / 1e3) / 1e9
            rows_out.append(
                dict(
                    threads=threads,
                    rows=rows,
                    ms=ms,
                    stream_ms=stream_ms,
                    ratio=ms / stream_ms,
                    gflop=flops / 1e9,
                    gflops=rate,
                    peak=peak,
                    bw=bw,
                    products_ms=alone,
                )
            )
    params = sum(p.numel() for p in model.parameters())
    intro = (
        f"`{args.checkpoint}` ({params:,} parameters, {nbytes / 1e6:.0f} MB read per step, "
        f"{service.runtime()['precision']}); {platform.machine()}, torch {torch.__version__}; "
        + "; ".join(header)
        + (" (oneDNN on plain weights: --no-prepack)" if args.no_prepack else "")
    )
    return intro, rows_out


def table(rows: list[dict]) -> str:
    lines = [
        "| threads | rows | ms/step | weights streamed once (ms) | step / stream | GFLOP/step "
        "| GFLOP/s | of peak | products alone (ms) | step / products |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['threads']} | {r['rows']} | {r['ms']:.1f} | {r['stream_ms']:.1f} "
            f"| {r['ratio']:.2f}x | {r['gflop']:.2f} | {r['gflops']:.0f} "
            f"| {r['gflops'] / r['peak']:.0%} | {r['products_ms']:.1f} "
            f"| {r['ms'] / r['products_ms']:.2f}x |"
        )
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Replace the text under SECTION (up to the next heading of level 1-3) by `body`, or append
    the section at the end of the file."""
    text = path.read_text(encoding="utf-8")
    block = f"{SECTION}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^#{{1,3}} |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text, count=1)
        text = text.rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", default=DEFAULT)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-prepack", action="store_true", help="oneDNN reads the plain weights")
    p.add_argument("--quantization", choices=("none", "int8"), default="none")
    p.add_argument("--write", type=Path, help="rewrite this file's section (BENCHMARKS.md)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    intro, rows = measure(args)
    command = "python bench/hardware_bench.py " + " ".join(argv)
    body = f"Command: `{command.strip()}`.\n\n{intro}.\n\n{table(rows)}"
    print(body)
    if args.write:
        write_section(args.write, body)


if __name__ == "__main__":
    main()
