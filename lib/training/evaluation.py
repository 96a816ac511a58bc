"""Validation: loss and bits per byte over the validation blocks and the named held-out sets,
every `--eval-every` steps (a callback) and once on the whole split at the end of a run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lib.data import DataSplits
from lib.metrics import bits_per_byte
from lib.training.artifacts import TrainingArtifacts
from lib.training.callbacks import Callback, RunState


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


class PeriodicEvaluation(Callback):
    """Validation every `every` steps (not at the last step: the end of the run evaluates the
    whole split), its figures added to the step's metrics; `write` (rank 0's) prints them."""

    def __init__(
        self,
        model: torch.nn.Module,
        data: DataSplits,
        every: int,
        max_steps: int,
        max_batches: int | None,
        autocast,
        write: Callable[[str], None] | None,
    ):
        self.model, self.data, self.autocast = model, data, autocast
        self.every, self.max_steps, self.max_batches, self.write = (
            every,
            max_steps,
            max_batches,
            write,
        )

    def on_step_metrics(self, state: RunState) -> None:
        if not (self.every and state.step % self.every == 0 and state.step < self.max_steps):
            return
        state.metrics.update(
            evaluate(self.model, self.data, max_batches=self.max_batches, autocast=self.autocast)
        )
        state.metrics["val_perplexity"] = math.exp(min(state.metrics["val_loss"], 50))
        if self.write:
            self.write(
                f"step {state.step}: train loss {state.loss:.4f}, val loss {state.metrics['val_loss']:.4f}, "
                f"val bits/byte {state.metrics['val_bits_per_byte']:.4f}"
                + "".join(f", {k} {v:.4f}" for k, v in heldout_figures(state.metrics).items())
            )


def final_evaluation(a: TrainingArtifacts, say: Callable[..., None]) -> tuple[dict, float]:
    """The end of a run: `evaluate` on the whole validation split (the training model, sharded or
    not), printed and reported as final/...; returns the figures and the run's seconds so far."""
    final = evaluate(a.model, a.data, autocast=a.autocast)
    wall = time.perf_counter() - a.t0
    say(
        f"final: val loss {final['val_loss']:.4f}, val bits/byte {final['val_bits_per_byte']:.4f}, "
        + "".join(f"{k} bits/byte {v:.4f}, " for k, v in heldout_figures(final).items())
        + f"{a.state.step} steps, {a.state.tokens_seen:,} tokens, {wall:.0f}s"
    )
    a.reporter.log(
        {
            "final/val_loss": final["val_loss"],
            "final/val_bits_per_byte": final["val_bits_per_byte"],
            **{f"final/{k}": v for k, v in final.items() if k.startswith("heldout")},
        },
        a.state.step,
    )
    return final, wall
