"""What runs around the training steps: time limit, preemption signals, throughput/MFU,
reporting and the progress bar here; validation (lib/training/evaluation.py), sample
continuations (lib/training/card.py) and periodic saves (lib/training/saving.py) beside them.

After every optimizer step the loop calls, in the order of its callbacks: `on_step_end` (watch
the step; setting `state.stop_reason` asks the loop to save a resumable checkpoint, export the
model and exit cleanly), then, once the ranks agree on stopping, `on_step_metrics` (add figures
to the step's metrics: every rank calls it, so it may run collectives), then the loop logs the
step, then `on_step_logged` (act on the logged step). `on_loop_end` comes after the last step,
before the final save, evaluation and export; `on_train_end` always, last.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

log = logging.getLogger("lib.training")

# dense bf16 peaks (no 2:4 sparsity figures): what MFU is measured against
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class RunState:
    step: int = 0
    tokens_seen: int = 0
    loss: float = float("nan")
    lr: float = 0.0
    grad_norm: float = 0.0
    stop_reason: str | None = None  # "time_limit" | "signal:SIGTERM" | ... ends the loop
    metrics: dict = field(default_factory=dict)  # what the step adds to the log


class Callback:
    def on_train_start(self, state: RunState) -> None: ...
    def on_step_end(self, state: RunState) -> None: ...
    def on_step_metrics(self, state: RunState) -> None: ...
    def on_step_logged(self, state: RunState) -> None: ...
    def on_loop_end(self, state: RunState) -> None: ...
    def on_train_end(self, state: RunState) -> None: ...


class TimeLimit(Callback):
    """Stop `reserve_s` before the wall-clock budget ends, leaving time to save and export."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def on_step_end(self, state: RunState) -> None:
        if time.perf_counter() >= self.deadline and state.stop_reason is None:
            state.stop_reason = "time_limit"


class PreemptionSignals(Callback):
    """SIGTERM / SIGUSR1 (a scheduler preempting the job) -> save at the end of the step and exit."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handler(self, signum, _frame):
        self.received = signal.Signals(signum).name

    def on_train_start(self, state: RunState) -> None:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_step_end(self, state: RunState) -> None:
        if self.received and state.stop_reason is None:
            state.stop_reason = f"signal:{self.received}"

    def on_train_end(self, state: RunState) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6N + 12·L·H·Q·T."""
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class Throughput(Callback):
    """tokens/s over the last `window` steps, and MFU when the device's peak is known."""

    def __init__(
        self, flops_per_token: float, peak: float | None, world_size: int = 1, window: int = 20
    ):
        self.fpt, self.peak, self.world, self.window = flops_per_token, peak, world_size, window
        self._marks: list[tuple[float, int]] = []

    def on_step_end(self, state: RunState) -> None:
        self._marks.append((time.perf_counter(), state.tokens_seen))
        self._marks = self._marks[-(self.window + 1) :]
        if len(self._marks) < 2:
            return
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        tok_s = (n1 - n0) / max(t1 - t0, 1e-9)
        state.metrics["tokens_per_s"] = tok_s
        if self.peak:
            state.metrics["mfu"] = tok_s * self.fpt / (self.peak * self.world)


class Reporter(Callback):
    """Sends the step's metrics to W&B or TensorBoard (or nowhere).

    W&B's project and mode come in as settings (`wandb_project`, `wandb_mode`; the CLI fills
    them from WANDB_PROJECT / WANDB_MODE / WANDB_API_KEY): the process environment is left alone.
    """

    def __init__(
        self,
        kind: str,
        output_dir,
        run_name: str,
        config: dict,
        project: str = "ru-gpt",
        mode: str = "offline",
    ):
        self.kind = kind
        self.run = None
        if kind == "wandb":
            import wandb

            # offline (the default) logs to OUTPUT_DIR/wandb, synced later with `wandb sync`:
            # it never prompts for a login or blocks on the network
            self.run = wandb.init(
                project=project,
                name=run_name,
                dir=str(output_dir),
                config=config,
                mode=mode,
                settings=wandb.Settings(silent=True),
                reinit="finish_previous",
            )
        elif kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.run = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        elif kind != "none":
            raise ValueError(f"unknown report target {kind!r}; use none, wandb or tensorboard")

    def log(self, metrics: dict, step: int) -> None:
        if self.kind == "wandb":
            self.run.log(metrics, step=step)
        elif self.kind == "tensorboard":
            for k, v in metrics.items():
                if isinstance(v, int | float):
                    self.run.add_scalar(k, v, step)
                elif isinstance(v, str):
                    self.run.add_text(k, v, step)

    def on_train_end(self, state: RunState) -> None:
        if self.kind == "wandb":
            self.run.finish()
        elif self.kind == "tensorboard":
            self.run.close()


class Progress(Callback):
    """The progress bar (on rank 0, with --progress): a tick per logged step, with the loss, the
    LR, tokens/s and, under a time limit, the seconds left. `write` prints a line above it."""

    def __init__(self, total: int | None, deadline: float | None, enabled: bool):
        self.total, self.deadline, self.enabled = total, deadline, enabled
        self.bar = None

    def on_train_start(self, state: RunState) -> None:
        self.bar = tqdm(
            total=self.total,
            initial=0 if self.total is None else state.step,
            desc="train",
            disable=not self.enabled,
            dynamic_ncols=True,
        )

    def write(self, line: str) -> None:
        self.bar.write(line)

    def on_step_logged(self, state: RunState) -> None:
        self.bar.update(1)
        postfix = {
            "loss": f"{state.loss:.3f}",
            "lr": f"{state.lr:.2e}",
            "tok_s": f"{state.metrics.get('tokens_per_s', 0):.0f}",
        }
        if self.deadline:
            postfix["left"] = f"{max(self.deadline - time.perf_counter(), 0):.0f}s"
        self.bar.set_postfix(postfix)

    def on_loop_end(self, state: RunState) -> None:
        self.bar.close()
