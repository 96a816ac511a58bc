"""Build GPT-2 causal LMs from presets, and the figures of a run that a checkpoint's card shows.

Reading, loading and (atomically) saving checkpoint directories is lib/checkpoint.py's job; what
a training run writes into one (its card, README and generation defaults) is lib/training/card.py's.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

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
