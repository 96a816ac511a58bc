"""Bits per byte of a checkpoint on its own validation split and on named held-out sets, measured
as training measures them (`lib.training.evaluation.evaluate`: packed blocks of the model's context,
documents joined by the end-of-text token). Each held-out figure is followed by the part of it
spent predicting the end-of-text token after each document: on a set of short texts (proverbs)
that part depends on how the training documents were joined (`--join-documents`), the rest on
how well the model knows the language.

    python bench/heldout_eval.py models/default --eval-data ru-proverbs=.cache/heldout/ru-proverbs.txt

`--block-size` evaluates every checkpoint at one context (a model trained at 128 tokens, at 256:
its positions beyond 128 were never trained). `--quantization int8` evaluates the model as
`ML_SERVICE_QUANTIZATION=int8` serves it (lib/inference/quantization.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.checkpoint import load_model, read_card  # noqa: E402
from lib.data import DataSplits, heldout_sets, load_documents, split_documents, tokenize_and_pack  # noqa: E402
from lib.inference.quantization import quantize  # noqa: E402
from lib.tokenizer import load_tokenizer, token_byte_lengths  # noqa: E402
from lib.training.evaluation import evaluate, heldout_figures  # noqa: E402


def measure(
    checkpoint: Path, eval_data: list[str], block_size: int | None = None, quantization="none"
) -> dict:
    card = read_card(checkpoint)
    config = card.get("config", {})
    tokenizer = load_tokenizer(checkpoint)
    model = quantize(load_model(checkpoint), quantization)
    block = block_size or int(card.get("block_size") or model.config.n_positions)
    if block > model.config.n_positions:
        raise SystemExit(
            f"--block-size {block} exceeds the model's context {model.config.n_positions}"
        )
    _, val = split_documents(
        load_documents(config.get("data", "bundled")), config.get("val_fraction", 0.05)
    )
    data = DataSplits(
        train=tokenize_and_pack(val, tokenizer, block),  # unused by evaluate
        val=tokenize_and_pack(val, tokenizer, block),
        target_bytes=torch.tensor(token_byte_lengths(tokenizer), dtype=torch.float64),
        heldout=heldout_sets(tuple(eval_data), tokenizer, block),
    )
    out = evaluate(model, data)
    return {
        "block_size": block,
        "val_bits_per_byte": round(out["val_bits_per_byte"], 4),
        **{k: round(v, 4) for k, v in heldout_figures(out).items()},
        # of each set's figure, the bits/byte spent on predicting the end of each text
        **{
            f"{name} end-of-text": round(out[f"heldout_end_of_text/{name}"], 4)
            for name in heldout_figures(out)
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--eval-data", action="append", default=[], metavar="NAME=PATH")
    p.add_argument(
        "--block-size",
        type=int,
        help="context of the packed blocks (default: each checkpoint's training block size)",
    )
    p.add_argument("--quantization", choices=("none", "int8"), default="none")
    args = p.parse_args()
    for c in args.checkpoints:
        print(c, json.dumps(measure(c, args.eval_data, args.block_size, args.quantization)))


if __name__ == "__main__":
    main()
