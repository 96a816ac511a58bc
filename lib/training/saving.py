"""What a run writes: resumable training-state checkpoints (every `--save-every` steps, a
callback, and when the run stops early) and, at the end, the exported model in OUTPUT_DIR/final
(with its training card, and its ONNX export under --onnx); a LoRA run's is its adapter
(lib/training/lora_export.py). Every write is atomic.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from lib.checkpoint import save_checkpoint
from lib.export_onnx import export_onnx
from lib.modeling import build_model, unwrap_model
from lib.training.artifacts import DS_TAG, TrainingArtifacts
from lib.training.callbacks import Callback, RunState
from lib.training.card import default_generation_config, render_model_card, training_card
from lib.training.distributed import full_model_state, full_optimizer_state
from lib.training.lora_export import export_lora
from lib.training.state import checkpoints_dir, save_training_state


def save_state(a: TrainingArtifacts) -> Path:
    """Gather the full state (a collective under DDP/FSDP) and write it on rank 0."""
    model_state = full_model_state(a.model, a.ctx)
    optim_state = full_optimizer_state(a.model, a.optimizer, a.ctx)
    path, tmp = None, None
    if a.ctx.mode == "deepspeed":  # every rank writes its partitions into one temporary directory
        tmp = checkpoints_dir(a.config.output_dir) / f".step-{a.state.step:07d}.tmp-deepspeed"
        if a.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        a.ctx.barrier()
        a.model.save_checkpoint(str(tmp), tag=DS_TAG)
        a.ctx.barrier()
    if a.ctx.is_main:
        state = {
            "model": model_state,
            "optimizer": optim_state,
            "step": a.state.step,
            "tokens_seen": a.state.tokens_seen,
            "data": a.cursor.state_dict(),
            "rng": torch.get_rng_state(),
            "history": a.history,
            "vocab_size": a.vocab_size,
            "config": a.config.to_dict(),
            "lora": a.lora.state() if a.lora else None,  # a resumed LoRA run checks its base
        }
        path = save_training_state(
            a.config.output_dir,
            a.state.step,
            state,
            a.tokenizer,
            keep=a.config.save_total_limit,
            tmp=tmp,
        )
    a.ctx.barrier()
    return path


def export_model(a: TrainingArtifacts) -> torch.nn.Module | None:
    """A plain (unwrapped, unsharded) copy of the model on rank 0, for export and samples."""
    if a.ctx.mode == "baseline" and a.ctx.world_size == 1:
        return unwrap_model(a.model)
    state = full_model_state(a.model, a.ctx)
    if not a.ctx.is_main:
        return None
    plain = build_model(a.preset, vocab_size=a.vocab_size, eos_token_id=a.tokenizer.eos_token_id)
    plain.load_state_dict(state)
    return plain.eval()


class PeriodicSave(Callback):
    """A training-state checkpoint every `every` steps, unless the run is stopping (it saves
    then anyway). `save` is a collective: every rank calls it."""

    def __init__(self, every: int, save: Callable[[], object]):
        self.every, self.save = every, save

    def on_step_logged(self, state: RunState) -> None:
        if self.every and state.step % self.every == 0 and state.stop_reason is None:
            self.save()


def export_final(a: TrainingArtifacts, final: dict, wall: float, say: Callable[..., None]) -> Path:
    """OUTPUT_DIR/final: the plain model, its tokenizer and training card, written by rank 0
    (and exported to ONNX under --onnx); every rank returns its path."""
    cfg = a.config
    if a.lora:  # an adapter directory, or the merged checkpoint (--merge)
        return export_lora(a, final, wall, say)
    plain = export_model(a)
    out = Path(cfg.output_dir) / "final"
    if a.ctx.is_main:
        card = training_card(a, plain, final, wall)
        save_checkpoint(
            plain,
            a.tokenizer,
            out,
            card,
            generation_config=default_generation_config(a.tokenizer.eos_token_id),
            readme=render_model_card(card),
        )
        say(f"checkpoint written to {out}")
        if cfg.export_onnx:
            int8 = cfg.export_onnx == "int8"
            onnx_card = export_onnx(out, int8=int8, python=cfg.onnx_exporter_python)
            p = onnx_card["parity"]
            say(
                f"ONNX export written to {out / 'onnx'} (max |logit diff| "
                f"{p['max_abs_logit_difference']:.3g}, greedy identical {p['greedy_identical']})"
            )
    a.ctx.barrier()
    return out
