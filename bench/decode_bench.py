"""One decode step of the serving engine's `DecodeBatch`, without the engine or HTTP: the time
of a step at B running rows, with the matrix products in torch's default library (MKL on x86)
and with the engine's choice (oneDNN for every product at every row count where it is there;
see lib/inference/decoder.py), at 1 and 2 CPU threads.

Every row continues the same prompt for 64 tokens (EOS held off), sampled at temperature 0.8 with
the service's default top-k/top-p/repetition penalty; a row's time is the mean step time of one
such run, the best of `--repeats` (the machine is shared and noisy).

    python bench/decode_bench.py                 # prints a markdown table
    python bench/decode_bench.py --rows 1 16 --threads 1 --repeats 5
    python bench/decode_bench.py --top-k-off     # the sampling table: rows with top-k off
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lib.inference import GenerationParams, InferenceService
from lib.inference import decoder as decoder_module
from lib.inference.decoder import GPT2SlotDecoder
from lib.inference.generation import DecodeBatch, GenerationRequest
from lib.inference.prompts import encode_prompts
from lib.presets import DEFAULT_CHECKPOINT

PROMPT = "Привет, мир! Как дела у тебя сегодня? Расскажи мне что-нибудь интересное про Москву."


def step_ms(
    service: InferenceService,
    rows: int,
    onednn: bool,
    new_tokens: int,
    top_k_off: int = 0,
    prepack: bool = True,
) -> float:
    """Mean milliseconds per decode step of `rows` rows generating `new_tokens` tokens each, the
    first `top_k_off` of them with top-k off (top-p 0.95 alone: the whole vocabulary sorted).
    `prepack=False`: oneDNN reads the plain weights (no reordered copies; decoder.py)."""
    ids = encode_prompts(service.tokenizer, [PROMPT])[0]
    batch = DecodeBatch(service.model, service.tokenizer, max_rows=rows)
    if not prepack or not onednn:
        library = "auto" if onednn else "torch"
        batch.decoder = GPT2SlotDecoder(service.model, prepack=prepack, library=library)
    params = [
        GenerationParams(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            seed=i,
            top_k=0 if i < top_k_off else GenerationParams.top_k,
        )
        for i in range(rows)
    ]
    batch.admit([GenerationRequest(ids, p) for p in params])
    steps, t0 = 0, time.perf_counter()
    while batch.rows:
        batch.step()
        steps += 1
    return (time.perf_counter() - t0) / steps * 1000


def best_of(repeats: int, variants: list, measure) -> list[float]:
    """The least of `repeats` measurements of each variant, taken in turn (interleaved, so the
    machine's drift hits all of them alike); a variant listed twice is measured once."""
    times: dict = {v: [] for v in variants}
    for _ in range(repeats):
        for v in times:
            times[v].append(measure(v))
    return [min(times[v]) for v in variants]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--top-k-off",
        action="store_true",
        help="instead: the engine's step with none, one or every row sampling with top-k off",
    )
    args = p.parse_args()
    service = InferenceService.from_checkpoint(args.checkpoint)
    if args.top_k_off:
        sampling_table(service, args)
        return
    onednn_ok = decoder_module.onednn_linear()[0] is not None
    print(
        f"{platform.machine()}, torch {torch.__version__}, oneDNN linear "
        f"{'available' if onednn_ok else 'NOT available (both columns use torch)'}"
    )
    print()
    print(
        "| threads | rows | ms/step, torch only | ms/step, engine's choice | speed-up | ms per row-token |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in args.rows:
            plain, chosen = best_of(
                args.repeats,
                [False, True],
                lambda onednn, rows=rows: step_ms(service, rows, onednn, args.max_new_tokens),
            )
            print(
                f"| {threads} | {rows} | {plain:.2f} | {chosen:.2f} | {plain / chosen:.2f}x "
                f"| {chosen / rows:.3f} |"
            )


def sampling_table(service: InferenceService, args) -> None:
    print(
        "| threads | rows | ms/step, every row top-k 50 | one row top-k off | every row top-k off |"
    )
    print("| --- | --- | --- | --- | --- |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in args.rows:
            cells = best_of(
                args.repeats,
                [0, 1, rows],  # rows with top-k off
                lambda off, rows=rows: step_ms(service, rows, True, args.max_new_tokens, off),
            )
            print(f"| {threads} | {rows} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
