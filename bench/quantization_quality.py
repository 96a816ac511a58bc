"""What int8 serving (`ML_SERVICE_QUANTIZATION=int8`) costs in quality against fp32, on one
checkpoint: bits/byte on its validation split and on named held-out sets (as training measures
them, bench/heldout_eval.py), and greedy agreement: the same prompts continued greedily by both,
how many continuations are identical token for token and how many tokens they share before they
first differ.

    make heldout   # the held-out sets, once
    python bench/quantization_quality.py models/default \\
        --eval-data ru-proverbs=.cache/heldout/ru-proverbs.txt \\
        --eval-data freeciv-nations=.cache/heldout/freeciv-nations.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.heldout_eval import measure  # noqa: E402
from lib.export_onnx import PARITY_PROMPTS  # noqa: E402
from lib.inference import GenerationParams, InferenceService  # noqa: E402

PROMPTS = (
    *PARITY_PROMPTS,
    "Жили-были дед да баба, и была у них",
    "Утром мы пошли на реку, где",
    "Наука о языке изучает",
    "В древнем городе на берегу моря",
    "Если бы я знал, что",
    "The weather today is",
    "Поезд прибыл на станцию поздно вечером, и",
    "Главное в этой истории —",
)


def greedy_agreement(checkpoint: Path, new_tokens: int) -> dict:
    """Greedy continuations of PROMPTS by the fp32 and the int8 model: identical ones, and the
    mean share of tokens before the first difference."""
    fp32 = InferenceService.from_checkpoint(checkpoint)
    int8 = InferenceService.from_checkpoint(checkpoint, quantization="int8")
    params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0)
    same, shared = 0, 0.0
    for prompt in PROMPTS:
        a = fp32.generate(prompt, params).token_ids
        b = int8.generate(prompt, params).token_ids
        prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        same += a == b
        shared += prefix / max(len(a), 1)
    return {"prompts": len(PROMPTS), "identical": same, "shared": shared / len(PROMPTS)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--eval-data", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    figures = {
        q: measure(args.checkpoint, args.eval_data, quantization=q) for q in ("none", "int8")
    }
    sets = [k for k in figures["none"] if k.endswith("bits_per_byte") or k in args_names(args)]
    agree = greedy_agreement(args.checkpoint, args.new_tokens)
    print(f"`{args.checkpoint}`, bits/byte (lower is better):\n")
    print("| set | fp32 | int8 | int8 − fp32 |")
    print("| --- | --- | --- | --- |")
    for k in sets:
        a, b = figures["none"][k], figures["int8"][k]
        print(f"| {k.removesuffix('_bits_per_byte')} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    print(
        f"\nGreedy, {args.new_tokens} new tokens, {agree['prompts']} prompts: "
        f"{agree['identical']} identical; on average {agree['shared']:.0%} of the tokens "
        "before the first difference."
    )


def args_names(args) -> set[str]:
    return {spec.partition("=")[0] for spec in args.eval_data}


if __name__ == "__main__":
    main()
