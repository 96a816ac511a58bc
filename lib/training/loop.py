"""The training loop: data -> tokenizer -> model -> steps with evaluation -> HF checkpoint.

`build_training_artifacts(config)` assembles everything a run needs in one place (and restores it
from a training-state checkpoint when resuming); `train(config)` runs the steps. Loss is summed
over target tokens and divided by the number of target tokens in the whole optimizer step, so
gradient accumulation is loss-equivalent to a bigger batch.
"""

from __future__ import annotations

import contextlib
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm

from lib.allocator import keep_freed_memory
from lib.checkpoint import save_checkpoint
from lib.data import (
    DataSplits,
    bits_per_byte,
    drop_overlapping,
    heldout_sets,
    join_documents,
    load_documents,
    prepare_data,
    prepare_streaming_data,
    spec_path,
    split_documents,
)
from lib.modeling import (
    SAMPLE_SEED,
    build_model,
    count_parameters,
    sample_params,
    unwrap_model,
)
from lib.presets import ModelPreset
from lib.tokenizer import load_tokenizer, train_char_tokenizer, train_tokenizer
from lib.training.callbacks import (
    Callback,
    PreemptionSignals,
    Reporter,
    RunState,
    Throughput,
    TimeLimit,
    flops_per_token,
    peak_flops,
)
from lib.training.config import EXPORT_RESERVE_S, TrainingConfig, native_bf16
from lib.training.distributed import (
    DistContext,
    cleanup,
    full_model_state,
    full_optimizer_state,
    init_distributed,
    launched_processes,
    load_optimizer_state,
    wrap_model,
)
from lib.training.optim import build_optimizer
from lib.training.schedulers import lr_multiplier
from lib.training.state import (
    STATE_FILE,
    DataCursor,
    checkpoints_dir,
    latest_checkpoint,
    load_training_state,
    remove_interrupted_saves,
    save_training_state,
)

DS_TAG = "deepspeed"  # DeepSpeed's sub-directory inside a state checkpoint
SAMPLE_PROMPTS = ["Привет, мир!", "Москва", "Он открыл дверь и", "В начале было"]


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


@dataclass
class TrainingArtifacts:
    """Everything one run needs, built once by `build_training_artifacts`."""

    config: TrainingConfig
    preset: ModelPreset
    tokenizer: object
    data: DataSplits
    model: torch.nn.Module  # what the loop calls (compiled, if asked)
    optimizer: torch.optim.Optimizer
    schedule: Callable[[int, float], float]  # (step, time fraction) -> learning rate
    cursor: DataCursor
    callbacks: list[Callback]
    reporter: Reporter
    device: torch.device
    ctx: DistContext
    vocab_size: int  # the model's (may exceed the tokenizer's)
    precision: str
    # training and validation documents, and those dropped for holding a held-out text
    doc_counts: tuple[int, int, int | None]
    t0: float
    deadline: float | None
    state: RunState = field(default_factory=RunState)
    history: list[dict] = field(default_factory=list)
    resumed_from: Path | None = None

    def autocast(self):
        if (
            self.precision == "fp32" or self.ctx.mode == "deepspeed"
        ):  # DeepSpeed casts the model itself
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def token_loss_sum(
    model: torch.nn.Module, blocks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (nats) and per-target losses for blocks (B, T+1)."""
    inputs, targets = blocks[:, :-1], blocks[:, 1:]
    # unpadded blocks: an all-ones mask (passed so transformers does not warn about padding)
    logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits  # (B, T, vocab)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return losses.sum(), losses


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: DataSplits,
    batch_size: int = 32,
    max_batches: int | None = None,
    autocast=contextlib.nullcontext,
) -> dict:
    """Validation loss (nats/token) and bits per byte over the validation blocks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def over(blocks) -> tuple[float, int, float, float]:
        """Summed NLL, tokens, bytes of the targets, and the NLL of the end-of-text targets
        (the tokens of no bytes: the end of each document)."""
        total_nll, total_tokens, total_bytes, end_nll = 0.0, 0, 0.0, 0.0
        for i, start in enumerate(range(0, len(blocks), batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            batch = blocks.slice(start, start + batch_size).to(device)
            with autocast():
                nll, losses = token_loss_sum(model, batch)
            sizes = data.target_bytes[batch[:, 1:].cpu()].flatten()
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
            total_bytes += sizes.sum().item()
            end_nll += losses.cpu()[sizes == 0].sum().item()
        return total_nll, total_tokens, total_bytes, end_nll

    nll, tokens, nbytes, _ = over(data.val)
    out = {
        "val_loss": nll / max(tokens, 1),
        "val_bits_per_byte": bits_per_byte(nll, nbytes),
        "val_tokens": tokens,
    }
    for name, blocks in data.heldout.items():  # --eval-data: bits/byte of each named set
        nll, _, nbytes, end_nll = over(blocks)
        out[f"heldout/{name}_bits_per_byte"] = bits_per_byte(nll, nbytes)
        # the part of it spent predicting where each document ends: on a set of short texts it
        # is large, and it depends on how the training documents were joined, not on the text
        out[f"heldout_end_of_text/{name}"] = bits_per_byte(end_nll, nbytes)
    model.train(was_training)
    return out


def heldout_figures(metrics: dict) -> dict[str, float]:
    """{name: bits/byte} of the named held-out sets in an `evaluate` result."""
    prefix, suffix = "heldout/", "_bits_per_byte"
    return {
        k[len(prefix) : -len(suffix)]: v
        for k, v in metrics.items()
        if k.startswith(prefix) and k.endswith(suffix)
    }


def resolve_resume(config: TrainingConfig) -> Path | None:
    """The state checkpoint to resume from: None, the newest complete one ('auto'), or a path."""
    if not config.resume:
        return None
    if config.resume == "auto":
        remove_interrupted_saves(config.output_dir)
        return latest_checkpoint(config.output_dir)
    path = Path(config.resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {path}: not a complete training-state checkpoint (no {STATE_FILE})"
        )
    return path


def build_training_artifacts(config: TrainingConfig) -> TrainingArtifacts:
    """Data, tokenizer, model, optimizer, schedule, callbacks; restored from a checkpoint when resuming.

    The settings are validated and resolved first (`TrainingConfig.resolved`; `ConfigError`)."""
    t0 = time.perf_counter()
    config = config.resolved(launched_processes())
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    preset = config.model_preset()
    block_size = config.block_size or preset.n_positions  # at most n_positions (validated)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = init_distributed(config.mode, device.type)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    resume = resolve_resume(config)
    saved = load_training_state(resume) if resume else None

    # 1-3. documents split by content hash, tokenizer (the checkpoint's when resuming, a given one,
    # or a new one on the training split), packed blocks (cached, memory-mapped)
    vocab_size = config.vocab_size or preset.vocab_size

    def new_tokenizer(docs):
        if config.tokenizer_type == "char":
            return train_char_tokenizer(docs)
        return train_tokenizer(docs, vocab_size)

    tokenizer = None
    if resume:
        tokenizer = load_tokenizer(resume)
        vocab_size = saved["vocab_size"]
    elif config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    if config.streaming:
        data, tokenizer, doc_counts = prepare_streaming_data(
            config.data,
            tokenizer,
            block_size,
            config.val_fraction,
            config.cache_dir or Path(config.output_dir) / "token-cache",
            train_tokenizer_fn=new_tokenizer,
        )
        doc_counts = (*doc_counts, None)  # a stream is read once: not checked for held-out text
    else:
        train_docs, val_docs = split_documents(load_documents(config.data), config.val_fraction)
        train_docs += [d for source in config.train_extra for d in load_documents(source)]
        heldout_docs = [d for spec in config.eval_data for d in load_documents(spec_path(spec))]
        kept = drop_overlapping(train_docs, heldout_docs)  # never train on an evaluated text
        dropped = len(train_docs) - len(kept)
        train_docs = join_documents(kept, config.join_documents)
        tokenizer = tokenizer or new_tokenizer(train_docs)
        data = prepare_data(
            config.data,
            tokenizer,
            block_size,
            docs=(train_docs, val_docs),
            cache_dir=config.cache_dir,
        )
        doc_counts = (len(train_docs), len(val_docs), dropped)
    data.heldout = heldout_sets(config.eval_data, tokenizer, block_size, config.cache_dir)
    if not resume and (config.tokenizer or config.tokenizer_type == "char"):
        vocab_size = -(-len(tokenizer) // 64) * 64  # sized to the tokenizer, a multiple of 64
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary {vocab_size}"
        )

    # 4. model and optimizer (restored when resuming), wrapped for DDP/FSDP
    model = build_model(
        preset,
        vocab_size=vocab_size,
        dropout=config.dropout,
        eos_token_id=tokenizer.eos_token_id,
        seed=config.seed,
    ).to(device)
    n_params = count_parameters(model) - model.transformer.wpe.weight.numel()
    if saved:
        model.load_state_dict(saved["model"])
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = wrap_model(model, ctx)
    optimizer = build_optimizer(
        model, config.lr, config.weight_decay, config.betas, name=config.optimizer
    )
    if ctx.mode == "deepspeed":
        import deepspeed

        from lib.training.deepspeed import deepspeed_config

        model, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(config)
        )
        if saved:  # optimizer partitions (and ZeRO-3 parameters) from DeepSpeed's own files
            model.load_checkpoint(str(resume), tag=DS_TAG, load_lr_scheduler_states=False)
    cursor = DataCursor.start(len(data.train), config.seed)
    state, history = RunState(), []
    if saved:
        if ctx.mode != "deepspeed":
            load_optimizer_state(model, optimizer, saved["optimizer"], ctx)
        cursor.load_state_dict(saved["data"])
        torch.set_rng_state(saved["rng"])
        state.step, state.tokens_seen, history = (
            saved["step"],
            saved["tokens_seen"],
            saved["history"],
        )
    model.train()
    loop_model = torch.compile(model) if config.compile else model

    def schedule(step: int, time_fraction: float) -> float:
        return config.lr * lr_multiplier(
            step,
            schedule=config.scheduler,
            warmup_steps=config.warmup_steps,
            max_steps=config.max_steps,
            min_ratio=config.min_lr_ratio,
            time_fraction=time_fraction,
        )

    # 5. callbacks: time limit, preemption, throughput/MFU, reporting
    deadline = t0 + config.time_limit_s - EXPORT_RESERVE_S if config.time_limit_s else None
    fpt = flops_per_token(n_params, preset.n_layer, preset.n_head, preset.head_dim, block_size)
    reporter = Reporter(
        config.report_to if ctx.is_main else "none",
        Path(config.output_dir),
        config.run_name or Path(config.output_dir).name,
        config.to_dict(),
        project=config.wandb_project,
        mode=config.wandb_mode,
    )
    callbacks: list[Callback] = [
        PreemptionSignals(),
        # tokens_seen counts every rank's tokens: MFU divides by every rank's peak
        Throughput(fpt, peak_flops(device, config.peak_tflops), world_size=ctx.world_size),
    ]
    if deadline:
        callbacks.append(TimeLimit(deadline))
    callbacks.append(reporter)
    return TrainingArtifacts(
        config=config,
        preset=preset,
        tokenizer=tokenizer,
        data=data,
        model=loop_model,
        optimizer=optimizer,
        schedule=schedule,
        cursor=cursor,
        callbacks=callbacks,
        reporter=reporter,
        device=device,
        ctx=ctx,
        vocab_size=vocab_size,
        precision=config.precision,
        doc_counts=doc_counts,
        t0=t0,
        deadline=deadline,
        state=state,
        history=history,
        resumed_from=resume,
    )


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
    total = None if a.deadline else cfg.max_steps
    bar = tqdm(
        total=total,
        initial=0 if total is None else st.step,
        desc="train",
        disable=not cfg.progress or not ctx.is_main,
        dynamic_ncols=True,
    )
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
            if cfg.eval_every and st.step % cfg.eval_every == 0 and st.step < cfg.max_steps:
                st.metrics.update(
                    evaluate(a.model, a.data, max_batches=cfg.eval_batches, autocast=a.autocast)
                )
                st.metrics["val_perplexity"] = math.exp(min(st.metrics["val_loss"], 50))
                if ctx.is_main:
                    bar.write(
                        f"step {st.step}: train loss {st.loss:.4f}, val loss {st.metrics['val_loss']:.4f}, "
                        f"val bits/byte {st.metrics['val_bits_per_byte']:.4f}"
                        + "".join(f", {k} {v:.4f}" for k, v in heldout_figures(st.metrics).items())
                    )
            if (
                cfg.sample_every
                and st.step % cfg.sample_every == 0
                and ctx.world_size == 1
                and ctx.mode == "baseline"
            ):
                samples = sample_continuations(unwrap_model(a.model), a.tokenizer)
                st.metrics["samples"] = "\n".join(
                    f"{s['prompt']} → {s['completion']}" for s in samples
                )
            a.history.append(
                {"step": st.step, **{k: v for k, v in st.metrics.items() if k != "samples"}}
            )
            a.reporter.log(st.metrics, st.step)
            bar.update(1)
            postfix = {
                "loss": f"{st.loss:.3f}",
                "lr": f"{st.lr:.2e}",
                "tok_s": f"{st.metrics.get('tokens_per_s', 0):.0f}",
            }
            if a.deadline:
                postfix["left"] = f"{max(a.deadline - time.perf_counter(), 0):.0f}s"
            bar.set_postfix(postfix)
            if cfg.save_every and st.step % cfg.save_every == 0 and st.stop_reason is None:
                save_state(a)
        bar.close()
        if st.stop_reason:
            say(f"stopping at step {st.step}: {st.stop_reason}; saving a resumable checkpoint")
        state_dir = save_state(a) if (st.stop_reason or cfg.save_every) else None

        # final evaluation on the whole validation split (the training model, sharded or not), export
        final = evaluate(a.model, a.data, autocast=a.autocast)
        wall = time.perf_counter() - a.t0
        say(
            f"final: val loss {final['val_loss']:.4f}, val bits/byte {final['val_bits_per_byte']:.4f}, "
            + "".join(f"{k} bits/byte {v:.4f}, " for k, v in heldout_figures(final).items())
            + f"{st.step} steps, {st.tokens_seen:,} tokens, {wall:.0f}s"
        )
        a.reporter.log(
            {
                "final/val_loss": final["val_loss"],
                "final/val_bits_per_byte": final["val_bits_per_byte"],
                **{f"final/{k}": v for k, v in final.items() if k.startswith("heldout")},
            },
            st.step,
        )
        plain = export_model(a)
        out = Path(cfg.output_dir) / "final"
        if ctx.is_main:
            save_checkpoint(plain, a.tokenizer, out, training_card(a, plain, final, wall))
            say(f"checkpoint written to {out}")
            if cfg.export_onnx:
                from lib.export_onnx import export_onnx

                int8 = cfg.export_onnx == "int8"
                card = export_onnx(out, int8=int8, python=cfg.onnx_exporter_python)
                p = card["parity"]
                say(
                    f"ONNX export written to {out / 'onnx'} (max |logit diff| "
                    f"{p['max_abs_logit_difference']:.3g}, greedy identical {p['greedy_identical']})"
                )
        ctx.barrier()
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


def training_card(a: TrainingArtifacts, model: torch.nn.Module, final: dict, wall: float) -> dict:
    cfg, st = a.config, a.state
    return {
        "model_id": cfg.run_name or Path(cfg.output_dir).name,
        "preset": a.preset.name,
        "parameters": count_parameters(model),
        "data": cfg.data,
        "train_documents": a.doc_counts[0],
        "val_documents": a.doc_counts[1],
        "train_documents_dropped_as_heldout": a.doc_counts[2],
        "train_tokens": a.data.train.n_tokens,
        "val_tokens": final["val_tokens"],
        "vocab_size": model.config.vocab_size,
        "block_size": a.data.train.block_size,
        "steps": st.step,
        "tokens_seen": st.tokens_seen,
        "epochs": round(st.tokens_seen / max(a.data.train.n_tokens, 1), 2),
        "wall_clock_s": round(wall, 1),
        "val_loss": round(final["val_loss"], 4),
        "val_bits_per_byte": round(final["val_bits_per_byte"], 4),
        # --eval-data: bits/byte of each named held-out set (out-of-domain text)
        "heldout_bits_per_byte": {k: round(v, 4) for k, v in heldout_figures(final).items()},
        "stop_reason": st.stop_reason or "max_steps",
        "resumed_from": str(a.resumed_from) if a.resumed_from else None,
        "config": cfg.to_dict(),
        "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        if a.device.type == "cpu"
        else torch.cuda.get_device_name(a.device),
        "precision": a.precision,
        "mode": cfg.mode,
        "world_size": a.ctx.world_size,
        # the last window's figures (all ranks' tokens; MFU against all ranks' peak, when known; a
        # window that held an evaluation or a save is slower) and the run's mean (all of it counted)
        "throughput": {k: st.metrics[k] for k in ("tokens_per_s", "mfu") if k in st.metrics}
        | {"mean_tokens_per_s": round(st.tokens_seen / max(wall, 1e-9), 1)},
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "samples": sample_continuations(model, a.tokenizer),
    }


def sample_continuations(
    model, tokenizer, prompts: list[str] = SAMPLE_PROMPTS, seed: int = SAMPLE_SEED
) -> list[dict]:
    from lib.inference.generation import generate

    params = sample_params(seed)  # the serving defaults (the model card names them)
    results = generate(model, tokenizer, prompts, [params] * len(prompts))
    return [{"prompt": p, "completion": r.text} for p, r in zip(prompts, results, strict=True)]
