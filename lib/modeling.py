"""Build GPT-2 causal LMs from presets; save and load Hugging Face-format checkpoints.

A checkpoint directory holds config.json, generation_config.json, model.safetensors, the tokenizer
files and a training card (training_card.json + README.md). Plain `transformers` loads it.
Saves are atomic: everything is written to a temporary sibling directory that is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, GPT2LMHeadModel

from lib.config import ModelPreset

CARD_FILE = "training_card.json"


def model_config(
    preset: ModelPreset, vocab_size: int | None = None, dropout: float = 0.0, eos_token_id: int = 0
) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size or preset.vocab_size,
        n_positions=preset.n_positions,
        n_embd=preset.n_embd,
        n_layer=preset.n_layer,
        n_head=preset.n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        tie_word_embeddings=True,
        activation_function="gelu_pytorch_tanh",  # fused kernel; "gelu_new" is ~25% of a CPU step
        preset=preset.name,
    )


def build_model(
    preset: ModelPreset,
    vocab_size: int | None = None,
    dropout: float = 0.0,
    eos_token_id: int = 0,
    seed: int | None = None,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 LM for a preset (SDPA attention)."""
    if seed is not None:
        torch.manual_seed(seed)
    config = model_config(preset, vocab_size, dropout, eos_token_id)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (the tied input/output embedding counted once)."""
    if not isinstance(model, torch.nn.Module):  # e.g. an ONNX model: it knows its own count
        return model.num_parameters()
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP/FSDP/`torch.compile` wrappers, for export."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def default_generation_config(eos_token_id: int) -> GenerationConfig:
    """`generate()`'s defaults in the checkpoint: the serving defaults (`GenerationParams`)."""
    from lib.inference.generation import GenerationParams  # lib.inference imports this module

    p = GenerationParams()
    return GenerationConfig(
        do_sample=p.temperature > 0,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        max_new_tokens=p.max_new_tokens,
        min_new_tokens=p.min_new_tokens,
        repetition_penalty=p.repetition_penalty,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


SAMPLE_TOKENS, SAMPLE_SEED = 40, 0  # a training card's sample continuations
# A run's figures in its training card, as /metadata's `training` and the model card show them:
# what it was trained on, and what it reached
TRAINING_DATA = ("data", "train_documents", "val_documents")
TRAINING_RESULTS = (
    "steps",
    "tokens_seen",
    "wall_clock_s",
    "val_loss",
    "val_bits_per_byte",
    "heldout_bits_per_byte",
)
TRAINING_FIGURES = (*TRAINING_DATA, *TRAINING_RESULTS)


def sample_params(seed: int = SAMPLE_SEED):
    """How a training card's sample continuations are decoded (lib/training/loop.py): the serving
    defaults (`GenerationParams`), SAMPLE_TOKENS new tokens, a fixed seed."""
    from lib.inference.generation import GenerationParams

    return GenerationParams(max_new_tokens=SAMPLE_TOKENS, seed=seed)


def save_checkpoint(model: torch.nn.Module, tokenizer, out_dir: str | Path, card: dict) -> Path:
    """Write a complete HF-format checkpoint atomically (temp dir + rename); return its path."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model = unwrap_model(model)
        model.generation_config = default_generation_config(tokenizer.eos_token_id)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CARD_FILE).write_text(
            json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        (tmp / "README.md").write_text(render_model_card(card), encoding="utf-8")
        install_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def install_directory(tmp: Path, out_dir: Path) -> None:
    """Put the finished directory `tmp` (a sibling of `out_dir`) in place of `out_dir`: its files
    synced, its mode the umask's (mkdtemp makes it 0700), then renamed; an old `out_dir` is
    renamed away first and removed only after. A reader sees the old directory or the new one,
    never a mixture."""
    _fsync_dir(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> GPT2LMHeadModel:
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype or torch.float32, attn_implementation="sdpa"
    )
    return model.to(device).eval()


def read_card(path: str | Path) -> dict:
    f = Path(path) / CARD_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}


def render_model_card(card: dict) -> str:
    lines = [
        "---",
        "language: ru",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "---",
        f"# {card.get('model_id', 'GPT-2 checkpoint')}",
        "",
        "A GPT-2-family causal language model trained from scratch with this repository's `lib.training`.",
        "It loads with `transformers.AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`.",
        "",
        "| field | value |",
        "| --- | --- |",
    ]
    model = ("preset", "parameters", *TRAINING_DATA, "vocab_size", "block_size")
    for key in (*model, *TRAINING_RESULTS, "device", "torch_version", "transformers_version"):
        if key in card and card[key] not in ({}, None):
            value = card[key]
            if isinstance(value, dict):  # {held-out set: bits/byte}
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            lines.append(f"| {key} | {value} |")
    samples = card.get("samples") or []
    if samples:
        p = sample_params()
        heading = f"## Samples (temperature {p.temperature}, top-p {p.top_p}, seed {p.seed})"
        lines += ["", heading, ""]
        lines += [f"- **{s['prompt']}** → {s['completion']}" for s in samples]
    return "\n".join(lines) + "\n"
