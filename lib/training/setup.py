"""Setting up a run: data -> tokenizer -> model -> optimizer, schedule and callbacks, in one place
(`build_training_artifacts`), restored from a training-state checkpoint when resuming.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lib.data import (
    drop_overlapping,
    heldout_sets,
    join_documents,
    load_documents,
    prepare_data,
    prepare_streaming_data,
    spec_path,
    split_documents,
)
from lib.modeling import build_model, count_parameters
from lib.tokenizer import load_tokenizer, train_char_tokenizer, train_tokenizer
from lib.training import lora as lora_run
from lib.training.artifacts import DS_TAG, TrainingArtifacts, autocast_for
from lib.training.callbacks import (
    Callback,
    PreemptionSignals,
    Progress,
    Reporter,
    RunState,
    Throughput,
    TimeLimit,
    flops_per_token,
    peak_flops,
)
from lib.training.card import Samples
from lib.training.config import EXPORT_RESERVE_S, ConfigError, TrainingConfig
from lib.training.distributed import (
    init_distributed,
    launched_processes,
    load_optimizer_state,
    wrap_model,
)
from lib.training.evaluation import PeriodicEvaluation, evaluate
from lib.training.optim import build_optimizer
from lib.training.saving import PeriodicSave, save_state
from lib.training.schedulers import lr_multiplier
from lib.training.state import (
    STATE_FILE,
    DataCursor,
    latest_checkpoint,
    load_training_state,
    remove_interrupted_saves,
)


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
    elif config.init_from:  # LoRA: the base's tokenizer
        tokenizer = load_tokenizer(config.init_from)
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
        if config.lora_rank:  # the last documents held out: the before/after figures' text
            docs = lora_run.read_documents(config.data)
            train_docs, val_docs = lora_run.split_heldout_tail(docs, config.val_fraction)
        else:
            train_docs, val_docs = split_documents(load_documents(config.data), config.val_fraction)
        train_docs += [d for source in config.train_extra for d in load_documents(source)]
        heldout_docs = [d for spec in config.eval_data for d in load_documents(spec_path(spec))]
        kept = drop_overlapping(train_docs, heldout_docs)  # never train on an evaluated text
        dropped = len(train_docs) - len(kept)
        train_docs = join_documents(kept, config.join_documents)
        tokenizer = tokenizer or new_tokenizer(train_docs)
        try:
            data = prepare_data(
                config.data,
                tokenizer,
                block_size,
                docs=(train_docs, val_docs),
                cache_dir=config.cache_dir,
            )
        except ValueError as e:  # a part too short for one block: said before any step
            raise ConfigError(
                [
                    f"--data {config.data}: {e} in its training or held-out part (the held-out "
                    f"part is {config.val_fraction:.0%} of the documents, --val-fraction): give "
                    "more text"
                ]
            ) from None
        doc_counts = (len(train_docs), len(val_docs), dropped)
    data.heldout = heldout_sets(config.eval_data, tokenizer, block_size, config.cache_dir)
    if not resume and (config.tokenizer or config.tokenizer_type == "char"):
        vocab_size = -(-len(tokenizer) // 64) * 64  # sized to the tokenizer, a multiple of 64
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary {vocab_size}"
        )

    # 4. model and optimizer (restored when resuming), wrapped for DDP/FSDP; a LoRA run's is the
    # base with peft's adapter on it, the base evaluated first (the card's "before")
    lora = None
    if config.lora_rank:
        model, lora = lora_model(config, data, device, saved and (saved, resume))
    else:
        if saved and saved.get("lora"):
            raise ConfigError([f"--resume {resume}: a LoRA run's state (add its --lora-rank)"])
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
    if config.gradient_checkpointing and not lora:
        model.gradient_checkpointing_enable()
    model = wrap_model(model, ctx)
    optimizer = build_optimizer(
        model, config.lr, config.weight_decay, config.betas, name=config.optimizer
    )
    if ctx.mode == "deepspeed":
        from lib.training.deepspeed import initialize

        model, optimizer = initialize(model, optimizer, config)
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

    # 5. callbacks: preemption, throughput/MFU, time limit, reporting; then (they need the run)
    # validation, samples, the progress bar and periodic saves
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
    a = TrainingArtifacts(
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
        lora=lora,
    )
    progress = Progress(
        None if deadline else config.max_steps, deadline, config.progress and ctx.is_main
    )
    single = ctx.world_size == 1 and ctx.mode == "baseline"  # samples need the whole model
    callbacks += [
        PeriodicEvaluation(
            loop_model,
            data,
            config.eval_every,
            config.max_steps,
            config.eval_batches,
            a.autocast,
            write=progress.write if ctx.is_main else None,
        ),
        Samples(loop_model, tokenizer, config.sample_every if single else 0),
        progress,
        PeriodicSave(config.save_every, lambda: save_state(a)),
    ]
    return a


def lora_model(
    config: TrainingConfig, data, device: torch.device, resuming: tuple[dict, Path] | None
) -> tuple[torch.nn.Module, lora_run.LoraBase]:
    """A LoRA run's model: the base (--init-from) with its targets checked, a resumed state's
    base checked against it, the base evaluated on the held-out text, then wrapped by peft."""
    base = lora_run.load_base(config, device)
    lora_run.check_targets(base, lora_run.lora_targets(config), config.init_from)
    info = lora_run.describe_base(config, base)
    if resuming:
        lora_run.check_resumed_base(resuming[0], info, resuming[1])
    info.before = evaluate(
        base, data, autocast=lambda: autocast_for(config.precision, config.mode, device)
    )
    model = lora_run.adapt(base, config)
    info.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, info
