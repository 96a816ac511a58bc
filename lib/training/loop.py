"""The training loop: data -> tokenizer -> model -> steps with evaluation -> HF checkpoint.

It reads top to bottom like a recipe. Loss is summed over target tokens and divided by the
number of target tokens in the whole optimizer step, so gradient accumulation is loss-equivalent
to a bigger batch.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm

from lib.config import TrainingConfig, get_preset
from lib.data import DataSplits, bits_per_byte, load_documents, prepare_data, split_documents
from lib.modeling import build_model, count_parameters, save_checkpoint
from lib.tokenizer import load_tokenizer, train_tokenizer
from lib.training.optim import build_optimizer
from lib.training.schedulers import lr_multiplier

EXPORT_RESERVE_S = 30.0  # final evaluation + samples + atomic save of a small model
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


class NonFiniteLoss(RuntimeError):
    """Training diverged: the loss is NaN or infinite."""


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
    model: torch.nn.Module, data: DataSplits, batch_size: int = 32, max_batches: int | None = None
) -> dict:
    """Validation loss (nats/token) and bits per byte over the validation blocks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens, total_bytes = 0.0, 0, 0.0
    blocks = data.val.blocks
    for i, start in enumerate(range(0, len(blocks), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        batch = blocks[start : start + batch_size].to(device)
        nll, _ = token_loss_sum(model, batch)
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
        total_bytes += data.target_bytes[batch[:, 1:].cpu()].sum().item()
    model.train(was_training)
    return {
        "val_loss": total_nll / max(total_tokens, 1),
        "val_bits_per_byte": bits_per_byte(total_nll, total_bytes),
        "val_tokens": total_tokens,
    }


def train(config: TrainingConfig) -> TrainResult:
    """Run one single-process training run and export a checkpoint to config.output_dir/final."""
    t0 = time.perf_counter()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    preset = get_preset(config.preset)
    block_size = config.block_size or preset.n_positions
    if block_size > preset.n_positions:
        raise ValueError(
            f"block_size {block_size} exceeds the preset's context of {preset.n_positions}"
        )

    # 1. documents, split once by content hash
    train_docs, val_docs = split_documents(load_documents(config.data), config.val_fraction)

    # 2. tokenizer: reuse one, or train a byte-level BPE on the training split only
    vocab_size = config.vocab_size or preset.vocab_size
    tokenizer = (
        load_tokenizer(config.tokenizer)
        if config.tokenizer
        else train_tokenizer(train_docs, vocab_size)
    )
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary {vocab_size}"
        )

    # 3. packed blocks
    data = prepare_data(config.data, tokenizer, block_size, docs=(train_docs, val_docs))

    # 4. model, optimizer, schedule
    model = build_model(
        preset,
        vocab_size=vocab_size,
        dropout=config.dropout,
        eos_token_id=tokenizer.eos_token_id,
        seed=config.seed,
    )
    model.train()
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas)

    # 5. steps: a seeded permutation per epoch, so the data order is reproducible
    gen = torch.Generator().manual_seed(config.seed)
    order, cursor, epoch = torch.randperm(len(data.train), generator=gen), 0, 0
    history: list[dict] = []
    tokens_seen, step = 0, 0
    t_loop = time.perf_counter()
    # a wall-clock budget ends the loop early enough to evaluate and export within it
    deadline = t0 + config.time_limit_s - EXPORT_RESERVE_S if config.time_limit_s else None
    # a time-limited run shows the time left instead of a step-count ETA it will not reach
    total = None if deadline else config.max_steps
    bar = tqdm(total=total, desc="train", disable=not config.progress, dynamic_ncols=True)
    while step < config.max_steps:
        time_fraction = (time.perf_counter() - t_loop) / (deadline - t_loop) if deadline else 0.0
        lr = config.lr * lr_multiplier(
            step,
            schedule=config.scheduler,
            warmup_steps=config.warmup_steps,
            max_steps=config.max_steps,
            min_ratio=config.min_lr_ratio,
            time_fraction=time_fraction,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = []
        for _ in range(config.grad_accum):
            if cursor + config.batch_size > len(order):
                order, cursor, epoch = torch.randperm(len(data.train), generator=gen), 0, epoch + 1
            micro.append(data.train.blocks[order[cursor : cursor + config.batch_size]])
            cursor += config.batch_size
        n_targets = sum(b[:, 1:].numel() for b in micro)
        loss_total = 0.0
        for batch in micro:
            nll, _ = token_loss_sum(model, batch)
            (nll / n_targets).backward()
            loss_total += nll.item()
        loss = loss_total / n_targets
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss} at step {step}; lower --lr or check the data")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += n_targets
        tok_s = tokens_seen / (time.perf_counter() - t_loop)
        bar.update(1)
        postfix = {"loss": f"{loss:.3f}", "lr": f"{lr:.2e}", "tok_s": f"{tok_s:.0f}"}
        if deadline:
            postfix["left"] = f"{max(deadline - time.perf_counter(), 0):.0f}s"
        bar.set_postfix(postfix)
        record = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tok_s,
            "epoch": epoch,
        }
        if config.eval_every and step % config.eval_every == 0 and step < config.max_steps:
            record.update(evaluate(model, data, max_batches=config.eval_batches))
            bar.write(
                f"step {step}: train loss {loss:.4f}, val loss {record['val_loss']:.4f}, "
                f"val bits/byte {record['val_bits_per_byte']:.4f}"
            )
        history.append(record)
        if deadline and time.perf_counter() > deadline:
            bar.write(f"time limit of {config.time_limit_s:.0f}s reached at step {step}; exporting")
            break
    bar.close()

    # 6. final evaluation on the whole validation split, samples, export
    final = evaluate(model, data)
    wall = time.perf_counter() - t0
    print(
        f"final: val loss {final['val_loss']:.4f}, val bits/byte {final['val_bits_per_byte']:.4f}, "
        f"{step} steps, {tokens_seen:,} tokens, {wall:.0f}s"
    )
    card = {
        "model_id": config.run_name or Path(config.output_dir).name,
        "preset": preset.name,
        "parameters": count_parameters(model),
        "data": config.data,
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "train_tokens": data.train.n_tokens,
        "val_tokens": final["val_tokens"],
        "vocab_size": vocab_size,
        "block_size": block_size,
        "steps": step,
        "tokens_seen": tokens_seen,
        "epochs": round(tokens_seen / max(data.train.n_tokens, 1), 2),
        "wall_clock_s": round(wall, 1),
        "val_loss": round(final["val_loss"], 4),
        "val_bits_per_byte": round(final["val_bits_per_byte"], 4),
        "config": config.to_dict(),
        "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "samples": sample_continuations(model, tokenizer),
    }
    out = save_checkpoint(model, tokenizer, Path(config.output_dir) / "final", card)
    print(f"checkpoint written to {out}")
    return TrainResult(
        out, step, tokens_seen, wall, final["val_loss"], final["val_bits_per_byte"], history
    )


def sample_continuations(
    model, tokenizer, prompts: list[str] = SAMPLE_PROMPTS, seed: int = 0
) -> list[dict]:
    from lib.inference.generation import GenerationParams, generate

    params = GenerationParams(max_new_tokens=40, temperature=0.8, top_p=0.95, seed=seed)
    results = generate(model, tokenizer, prompts, [params] * len(prompts))
    return [{"prompt": p, "completion": r.text} for p, r in zip(prompts, results, strict=True)]
