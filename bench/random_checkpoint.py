"""Write a randomly initialised checkpoint of a preset (HF format, the default model's tokenizer),
for speed measurements of sizes we have not trained, e.g. the serving benchmark on a GPU:

    python bench/random_checkpoint.py --preset gpt2-124m --out runs/bench/random-gpt2-124m
    python bench/serve_bench.py --checkpoint runs/bench/random-gpt2-124m --device cuda --stream
    python bench/random_checkpoint.py --preset gpt2-124m --tokenizer-vocab   # 4,096-token head

The weights are noise, so the text is too; the model card says so. The vocabulary is the preset's
(50,257 for the GPT-2 presets: the output projection has its real size), larger than the
tokenizer's, whose ids it covers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lib.checkpoint import save_checkpoint
from lib.inference import InferenceService
from lib.modeling import build_model
from lib.presets import DEFAULT_CHECKPOINT, PRESETS, get_preset
from lib.training.card import default_generation_config


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS))
    p.add_argument("--out", type=Path, help="default: runs/bench/random-PRESET")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tokenizer-vocab",
        action="store_true",
        help="the tokenizer's vocabulary (4,096 for the default) instead of the preset's: the "
        "output projection of the checkpoints we train",
    )
    args = p.parse_args(argv)
    suffix = "-vocab4k" if args.tokenizer_vocab else ""
    out = args.out or Path("runs/bench") / f"random-{args.preset}{suffix}"
    service = InferenceService.random_baseline(args.preset, args.tokenizer, seed=args.seed)
    if args.tokenizer_vocab:
        tok = service.tokenizer
        service.model = build_model(
            get_preset(args.preset), len(tok), eos_token_id=tok.eos_token_id, seed=args.seed
        )
    params = sum(t.numel() for t in service.model.parameters())
    card = {
        "model_id": f"random-{args.preset}",
        "preset": args.preset,
        "random_weights": True,
        "note": "randomly initialised, never trained: for speed measurements only",
        "parameters": params,
    }
    readme = (
        f"# random-{args.preset}\n\nA randomly initialised `{args.preset}` ({params:,} "
        "parameters) that was never trained: its text is noise. Written by "
        "`bench/random_checkpoint.py` for speed measurements only.\n"
    )
    generation = default_generation_config(service.tokenizer.eos_token_id)
    path = save_checkpoint(
        service.model, service.tokenizer, out, card, generation_config=generation, readme=readme
    )
    print(f"{path}: random {args.preset}, {params:,} parameters")
    return path


if __name__ == "__main__":
    main()
