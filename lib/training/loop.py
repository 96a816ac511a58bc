"""The training loop: steps over the data, with the run's callbacks around each, then the final
save, evaluation and export.

`build_training_artifacts` (lib/training/setup.py) assembles the run; `train(config)` runs its
steps. Loss is summed over target tokens and divided by the number of target tokens in the whole
optimizer step, so gradient accumulation is loss-equivalent to a bigger batch. Validation,
samples, progress and periodic saves are callbacks (lib/training/callbacks.py says when each
hook runs).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lib.allocator import keep_freed_memory
from lib.training.artifacts import TrainingArtifacts
from lib.training.config import TrainingConfig, native_bf16
from lib.training.distributed import cleanup, launched_processes
from lib.training.evaluation import final_evaluation, token_loss_sum
from lib.training.saving import export_final, save_state
from lib.training.setup import build_training_artifacts


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    tokens_seen: int
    wall_clock_s: float
    val_loss: float
    val_bits_per_byte: float
    history: list[dict]
    stop_reason: str = "max_steps"
    state_checkpoint: Path | None = None


class NonFiniteLoss(RuntimeError):
    """Training diverged: the loss is NaN or infinite."""


def cut_rows(batch: torch.Tensor, length: int) -> torch.Tensor:
    """Blocks (B, S + 1) as rows (B·S/length, length + 1) that overlap by one token, like the
    blocks themselves: the same targets, each predicted from at most `length` tokens of context
    (`--short-context`)."""
    return batch.unfold(1, length + 1, length).reshape(-1, length + 1)


def accumulate_gradients(
    model,
    micro_batches: list[torch.Tensor],
    autocast=contextlib.nullcontext,
    scale=lambda loss: loss,
    backward=None,
) -> float:
    """Backward over micro-batches, each scaled by the step's total target count (not the micro-batch's),
    so the gradient equals that of one big batch. Returns the loss per target token."""
    device = next(model.parameters()).device
    n_targets = sum(b[:, 1:].numel() for b in micro_batches)
    loss_total = 0.0
    for batch in micro_batches:
        with autocast():
            nll, _ = token_loss_sum(model, batch.to(device))
        if backward is None:
            scale(nll / n_targets).backward()
        else:
            backward(nll / n_targets)
        loss_total += nll.item()
    return loss_total / n_targets


def train_step(
    a: TrainingArtifacts, micro_batches: list[torch.Tensor], scaler
) -> tuple[float, float]:
    """One optimizer step over micro-batches; returns (loss per target token, grad norm)."""
    if a.ctx.mode == "deepspeed":
        engine = a.model

        def backward(
            loss,
        ):  # already normalised over the whole step: no division by the accumulation count
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only

        loss = accumulate_gradients(engine, micro_batches, a.autocast, backward=backward)
        return loss, float(engine.get_global_grad_norm() or 0.0)
    loss = accumulate_gradients(a.model, micro_batches, a.autocast, scaler.scale)
    scaler.unscale_(a.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(a.model.parameters(), a.config.grad_clip)
    grad_norm = (
        grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    )  # FSDP: a DTensor
    scaler.step(a.optimizer)
    scaler.update()
    a.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm.item()


def train(config: TrainingConfig) -> TrainResult:
    """Run (or resume) a training run (one process, or one of torchrun's); export OUTPUT_DIR/final.

    Checks every setting before any work (`TrainingConfig.validate`: a `ConfigError` lists every
    problem) and fills in the defaults that follow others (`TrainingConfig.resolved`)."""
    keep_freed_memory()  # every step reuses the last one's memory instead of faulting in new pages
    a = build_training_artifacts(config.resolved(launched_processes()))
    cfg, st, ctx = a.config, a.state, a.ctx
    say = print if ctx.is_main else (lambda *_, **__: None)
    if a.resumed_from:
        say(f"resuming from {a.resumed_from} at step {st.step}")
    if a.precision == "bf16" and a.device.type == "cpu" and not native_bf16("cpu"):
        say(
            "warning: this CPU has no native bfloat16 (AVX-512 BF16 or AMX), so bf16 autocast is "
            "emulated and far slower than fp32; --precision auto picks fp32 here",
            file=sys.stderr,
        )
    scaler = torch.amp.GradScaler(a.device.type, enabled=a.precision == "fp16")
    t_loop = time.perf_counter()
    bs = cfg.batch_size
    for cb in a.callbacks:
        cb.on_train_start(st)
    try:
        while st.step < cfg.max_steps and st.stop_reason is None:
            time_fraction = (
                (time.perf_counter() - t_loop) / (a.deadline - t_loop) if a.deadline else 0.0
            )
            st.lr = a.schedule(st.step, time_fraction)
            for group in a.optimizer.param_groups:
                group["lr"] = st.lr
            # every rank draws the same global batch from the same cursor and takes its own slice
            micro = [
                a.data.train.batch(
                    a.cursor.next_indices(bs * ctx.world_size)[ctx.rank * bs : (ctx.rank + 1) * bs]
                )
                for _ in range(cfg.grad_accum)
            ]
            progress = time_fraction if a.deadline else st.step / cfg.max_steps
            if cfg.short_context and progress < cfg.short_context_until:
                micro = [cut_rows(b, cfg.short_context) for b in micro]
            loss, st.grad_norm = train_step(a, micro, scaler)
            st.loss = ctx.mean(loss)
            if not math.isfinite(st.loss):
                raise NonFiniteLoss(
                    f"loss became {st.loss} at step {st.step}; lower --lr or check the data"
                )
            st.step += 1
            st.tokens_seen += sum(b[:, 1:].numel() for b in micro) * ctx.world_size
            st.metrics = {
                "loss": st.loss,
                "lr": st.lr,
                "grad_norm": st.grad_norm,
                "epoch": a.cursor.epoch,
            }
            for cb in a.callbacks:
                cb.on_step_end(st)
            if ctx.any(st.stop_reason is not None) and st.stop_reason is None:
                st.stop_reason = "another rank stopped"  # ranks stop together, or collectives hang
            for cb in a.callbacks:  # validation, samples
                cb.on_step_metrics(st)
            a.history.append(
                {"step": st.step, **{k: v for k, v in st.metrics.items() if k != "samples"}}
            )
            a.reporter.log(st.metrics, st.step)
            for cb in a.callbacks:  # the progress bar, periodic saves
                cb.on_step_logged(st)
        for cb in a.callbacks:
            cb.on_loop_end(st)
        if st.stop_reason:
            say(f"stopping at step {st.step}: {st.stop_reason}; saving a resumable checkpoint")
        state_dir = save_state(a) if (st.stop_reason or cfg.save_every) else None
        final, wall = final_evaluation(a, say)
        out = export_final(a, final, wall, say)
    finally:
        for cb in a.callbacks:
            cb.on_train_end(st)
        cleanup()
    return TrainResult(
        out,
        st.step,
        st.tokens_seen,
        wall,
        final["val_loss"],
        final["val_bits_per_byte"],
        a.history,
        st.stop_reason or "max_steps",
        state_dir,
    )
