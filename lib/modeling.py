"""Build GPT-2 causal LMs from presets, and what a checkpoint's model card says about one.

Reading, loading and (atomically) saving checkpoint directories is lib/checkpoint.py's job.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from lib.presets import ModelPreset


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
