"""Export a checkpoint to ONNX, check it against PyTorch, and optionally quantize it to int8.

    python -m lib.export_onnx CHECKPOINT [--int8] [--out DIR]      (make export-onnx CHECKPOINT=…)

The graph comes from Hugging Face's maintained exporter (`optimum-onnx`, task
`text-generation-with-past`: the GPT-2 decoder with its KV cache as inputs and outputs). That
exporter pins `transformers<4.58` while the product runs transformers 5, so it runs in its own
environment (`make onnx-venv` builds `.venv-onnx`; `--exporter-python`, by default
$ML_ONNX_EXPORTER_PYTHON, names another interpreter), as a subprocess reading the checkpoint
directory (`lib/onnx_exporter.py`). Everything after it runs here:

1. **Parity** with PyTorch, on a batch of prompts of different lengths, right-padded: the largest
   absolute logit difference over the real positions must be within `--tolerance`, and greedy
   continuations (our engine over each runtime) must be identical. A failed check installs nothing.
2. **int8** (`--int8`): ONNX Runtime's dynamic quantization of the matrices (int8 weights,
   activations quantized per call), written beside the fp32 file; its greedy agreement with fp32
   is measured, not required.
3. **Quality**: bits per UTF-8 byte of PyTorch fp32, ONNX fp32 and ONNX int8 on held-out text (the
   checkpoint's own validation documents, each scored alone behind its end-of-text token; or
   `--eval-text FILE`).

The result is a directory (default CHECKPOINT/onnx) with `model.onnx` (and `model.int8.onnx`),
the config, the tokenizer, the training card and `onnx_card.json` (opset, the exporter's
versions, the source checkpoint's content hash, the parity and quality figures). It is written
to a temporary directory and renamed into place: a failed export never leaves half a model.
`ML_SERVICE_BACKEND=onnxruntime` serves it (docs/extend.md, "ONNX").
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from lib.metrics import bits_per_byte
from lib.onnx_exporter import ExportError, exporter_python, exporter_versions, run_exporter

log = logging.getLogger(__name__)

CARD_FILE = "onnx_card.json"
TOLERANCE = 1e-4  # the largest absolute logit difference fp32 ONNX may show against PyTorch
PARITY_PROMPTS = (
    "Привет, мир!",
    "Старый учитель открыл книгу и",
    "Москва",
    "В лесу родилась ёлочка, в лесу она росла. Зимой и летом стройная",
    "Когда мы вышли из дома, на улице уже",
    "Он сказал, что",
    "Весной в городе открылся новый музей, и первые посетители",
    "Я",
)
GREEDY_TOKENS = 32
EVAL_DOCUMENTS = 400  # held-out documents scored for bits/byte (the first N, in a fixed order)
COPIED_FILES = (  # what serving needs beside the graph (the tokenizer, the card)
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "training_card.json",
)


# -- checks ---------------------------------------------------------------------------------------
def _padded(tokenizer, prompts: Sequence[str]):
    import torch

    from lib.inference.prompts import encode_prompts

    ids = encode_prompts(tokenizer, prompts)
    width = max(map(len, ids))
    input_ids = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, input_ids, mask


def logit_difference(reference, candidate, tokenizer, prompts: Sequence[str]) -> float:
    """The largest absolute difference of the two models' logits over the real (unpadded)
    positions of `prompts`, run as one right-padded batch."""
    import torch

    _, input_ids, mask = _padded(tokenizer, prompts)
    with torch.inference_mode():
        want = reference(input_ids=input_ids, attention_mask=mask).logits.float()
        got = candidate(input_ids=input_ids, attention_mask=mask).logits.float()
    real = mask.bool()
    return float((want[real] - got[real]).abs().max())


def greedy_texts(model, tokenizer, prompts: Sequence[str], tokens: int = GREEDY_TOKENS) -> list:
    """Greedy continuations by our engine's batch decoder over `model` (torch or ONNX)."""
    from lib.inference.offline import generate
    from lib.inference.types import GenerationParams

    params = [GenerationParams(max_new_tokens=tokens, temperature=0)] * len(prompts)
    return [r.text for r in generate(model, tokenizer, list(prompts), params)]


def texts_bits_per_byte(model, tokenizer, texts: Sequence[str], batch: int = 16) -> float:
    """Bits per UTF-8 byte of `texts`, each scored alone behind its end-of-text token."""
    from lib.inference.scoring import score_texts

    nll = total = 0.0
    for i in range(0, len(texts), batch):
        for s in score_texts(model, tokenizer, texts[i : i + batch]):
            nll -= s.log_likelihood
            total += s.num_bytes
    return bits_per_byte(nll, total)


def held_out_texts(
    checkpoint: Path, card: dict, tokenizer, context: int, limit: int = EVAL_DOCUMENTS
) -> tuple:
    """The checkpoint's own validation documents (from its training card's data and split),
    those that fit the context, the first `limit`; and a description of them."""
    from lib.data import load_documents, split_documents

    config = card.get("config", {})
    data, fraction = config.get("data", "bundled"), config.get("val_fraction", 0.05)
    try:
        _, val = split_documents(load_documents(data), fraction)
    except Exception as e:  # the run's data is not on this machine: the bundled corpus's split
        log.warning("validation data %r unavailable (%s); using the bundled corpus", data, e)
        data, fraction = "bundled", 0.05
        _, val = split_documents(load_documents(data), fraction)
    described = f"validation split of {data!r} ({fraction})"
    return _fitting(val, tokenizer, context, limit), described


def _fitting(texts: Sequence[str], tokenizer, context: int, limit: int) -> list[str]:
    """The first `limit` non-empty texts, each cut (at a token boundary) to what the model's
    context scores: its tokens behind the end-of-text token."""
    out = []
    for text in texts[: limit * 2]:
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        if len(enc["input_ids"]) >= context:
            text = text[: enc["offset_mapping"][max(context - 3, 0)][1]]  # a token of slack
        if text.strip():
            out.append(text)
        if len(out) == limit:
            break
    return out


def read_eval_file(path: Path, tokenizer, context: int, limit: int = EVAL_DOCUMENTS) -> list[str]:
    from lib.data import load_documents

    return _fitting(load_documents(str(path)), tokenizer, context, limit)


# -- the export -----------------------------------------------------------------------------------
def export_onnx(
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    int8: bool = False,
    tolerance: float = TOLERANCE,
    eval_text: str | Path | None = None,
    eval_documents: int = EVAL_DOCUMENTS,
    opset: int | None = None,
    optimize: str | None = None,
    python: str | None = None,
) -> dict:
    """Export the checkpoint at `checkpoint` to `out` (default CHECKPOINT/onnx), check it, and
    return its card (also written as onnx_card.json). ExportError when a check fails. `python`:
    the interpreter that has optimum-onnx (default: see `exporter_python`)."""
    import onnx
    import onnxruntime

    from lib.checkpoint import (
        ONNX_FILES,
        checkpoint_sha256,
        install_directory,
        load_model,
        read_card,
    )
    from lib.inference.onnx_model import OnnxCausalLM
    from lib.tokenizer import load_tokenizer

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint} (expected config.json)")
    out = Path(out) if out is not None else checkpoint / "onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    python = exporter_python(python)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        run_exporter(checkpoint, tmp, python, opset, optimize)
        for name in COPIED_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, tmp / name)
        exported_s = time.perf_counter() - t0

        tokenizer = load_tokenizer(checkpoint)
        card = read_card(checkpoint)
        torch_model = load_model(checkpoint)
        context = int(torch_model.config.n_positions)
        onnx_fp32 = OnnxCausalLM(tmp, "fp32")
        diff = logit_difference(torch_model, onnx_fp32, tokenizer, PARITY_PROMPTS)
        want = greedy_texts(torch_model, tokenizer, PARITY_PROMPTS)
        got = greedy_texts(onnx_fp32, tokenizer, PARITY_PROMPTS)
        same = sum(a == b for a, b in zip(want, got, strict=True))
        if not diff <= tolerance or same != len(want):  # `not <=`: a NaN fails too
            raise ExportError(
                f"the ONNX model does not match PyTorch: largest logit difference {diff:.3g} "
                f"(tolerance {tolerance:g}), {same}/{len(want)} greedy continuations identical"
            )
        if eval_text is not None:
            texts = read_eval_file(Path(eval_text), tokenizer, context, eval_documents)
            described = Path(eval_text).name
        else:
            texts, described = held_out_texts(checkpoint, card, tokenizer, context, eval_documents)
        if not texts:
            raise ExportError(f"no held-out text to measure bits/byte on ({described})")
        quality = {
            "texts": described,
            "documents": len(texts),
            "bytes": sum(len(t.encode()) for t in texts),
            "torch_fp32": round(texts_bits_per_byte(torch_model, tokenizer, texts), 4),
            "onnx_fp32": round(texts_bits_per_byte(onnx_fp32, tokenizer, texts), 4),
        }
        files = {"fp32": ONNX_FILES["fp32"]}
        quantized = None
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                tmp / ONNX_FILES["fp32"],
                tmp / ONNX_FILES["int8"],
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
            onnx_int8 = OnnxCausalLM(tmp, "int8")
            got8 = greedy_texts(onnx_int8, tokenizer, PARITY_PROMPTS)
            quality["onnx_int8"] = round(texts_bits_per_byte(onnx_int8, tokenizer, texts), 4)
            files["int8"] = ONNX_FILES["int8"]
            quantized = {
                "method": "onnxruntime dynamic quantization: int8 weights per output channel, "
                "activations quantized per call",
                "greedy_identical_to_fp32": f"{sum(a == b for a, b in zip(want, got8, strict=True))}"
                f"/{len(want)}",
                "bits_per_byte_cost": round(quality["onnx_int8"] - quality["onnx_fp32"], 4),
            }
        graph = onnx.load(str(tmp / ONNX_FILES["fp32"]), load_external_data=False)
        result = {
            "format": "onnx",
            "task": "text-generation-with-past",
            "opset": max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
            "optimize": optimize,
            "exporter": exporter_versions(python),
            "onnxruntime": onnxruntime.__version__,
            "exported_by": f"lib.export_onnx (ru-gpt-service {_our_version()})",
            "source": {"name": checkpoint.name, "sha256": checkpoint_sha256(checkpoint)},
            "files": files,
            "parity": {
                "prompts": len(PARITY_PROMPTS),
                "max_abs_logit_difference": float(f"{diff:.3g}"),
                "tolerance": tolerance,
                "greedy_tokens": GREEDY_TOKENS,
                "greedy_identical": f"{same}/{len(want)}",
            },
            "int8": quantized,
            "bits_per_byte": quality,
            "seconds": round(time.perf_counter() - t0, 1),
            "export_seconds": round(exported_s, 1),
        }
        (tmp / CARD_FILE).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
        install_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s in %.1fs", checkpoint.name, out, result["seconds"])
    return result


def _our_version() -> str:
    try:
        return importlib.metadata.version("ru-gpt-service")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lib.export_onnx",
        description="Export a checkpoint to ONNX (with its KV cache), check it against PyTorch, "
        "and optionally quantize it to int8.",
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (config.json, …)")
    parser.add_argument("--out", type=Path, help="where to write (default CHECKPOINT/onnx)")
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help=f"largest allowed |logit difference| against PyTorch (default {TOLERANCE:g})",
    )
    parser.add_argument(
        "--eval-text",
        type=Path,
        help="held-out .txt/.jsonl for bits/byte (default: the checkpoint's validation split)",
    )
    parser.add_argument(
        "--eval-documents",
        type=int,
        default=EVAL_DOCUMENTS,
        help=f"held-out documents scored (default {EVAL_DOCUMENTS})",
    )
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument(
        "--exporter-python",
        default=os.environ.get("ML_ONNX_EXPORTER_PYTHON"),  # the environment, read at the edge
        metavar="PYTHON",
        help="the interpreter that has optimum-onnx (default: $ML_ONNX_EXPORTER_PYTHON, else "
        ".venv-onnx's, else this one if it has the exporter)",
    )
    parser.add_argument(
        "--optimize",
        choices=("O1", "O2", "O3"),
        help="optimum's ONNX Runtime graph fusions, stored in the file (default: none; ONNX "
        "Runtime optimizes the graph when it loads it anyway, and O1-O2 measured no faster here)",
    )
    args = parser.parse_args(argv)
    # (onnxruntime's quantizer logs every tensor at INFO on the root logger)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    try:
        card = export_onnx(
            args.checkpoint,
            args.out,
            int8=args.int8,
            tolerance=args.tolerance,
            eval_text=args.eval_text,
            eval_documents=args.eval_documents,
            opset=args.opset,
            optimize=args.optimize,
            python=args.exporter_python,
        )
    except (ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = args.out or args.checkpoint / "onnx"
    p, q = card["parity"], card["bits_per_byte"]
    print(f"wrote {out} ({', '.join(card['files'].values())}), opset {card['opset']}")
    print(
        f"parity: max |logit diff| {p['max_abs_logit_difference']:.3g} (tolerance "
        f"{p['tolerance']:g}), greedy identical {p['greedy_identical']}"
    )
    bpb = ", ".join(f"{k} {q[k]}" for k in ("torch_fp32", "onnx_fp32", "onnx_int8") if k in q)
    print(f"bits/byte on {q['documents']} held-out documents: {bpb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
