"""The settings of one training run (`TrainingConfig`), their checks and the values that follow
from others.

The settings themselves, in groups with their defaults and help, are in
lib/training/settings.py; `TrainingConfig` gathers them into one flat set, the one place where a
training setting, its default, its help text and its checks live: `train_distributed.py`
generates its command line from the fields (`lib.cli.add_config_arguments`), and
`lib.training.train` validates and resolves the same object (`TrainingConfig.resolved`) before
any work.

The environment is read at the edge: the CLI turns W&B's variables (WANDB_PROJECT, WANDB_MODE,
WANDB_API_KEY) and ML_ONNX_EXPORTER_PYTHON into settings, and passes its mapping to
`launched_world_size`. Below it, only `lib/training/distributed.py` reads the environment:
torchrun's process-group variables (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT), which it also
fills in for a single process that needs a process group. (Libraries such as wandb, torch and
transformers read their own variables, and child processes, the engine's and the ONNX
exporter's, inherit the environment as it is.)

This module imports no torch: the CLI parses and checks its arguments before the heavy imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lib.cli import cli_flag, namespace_values, setting
from lib.onnx_exporter import ExportError, exporter_python
from lib.presets import PRESETS, ModelPreset, get_preset
from lib.training.lora_checks import base_preset, lora_problems
from lib.training.settings import (
    EVAL_EVERY_CAP,
    EVALS_PER_RUN,
    WARMUP_CAP,
    WARMUP_FRACTION,
    EvalSettings,
    LogSettings,
    LoraSettings,
    RunSettings,
    SaveSettings,
    SystemSettings,
    TrainSettings,
)

EXPORT_RESERVE_S = 30.0  # a time-limited run stops this long before the end to evaluate and save


def launched_world_size(environ: Mapping[str, str]) -> int:
    """Processes of the run, from the launcher's environment (torchrun's WORLD_SIZE; 1 without
    torchrun): they share a `max_tokens` budget."""
    return int(environ.get("WORLD_SIZE", "1"))


class ConfigError(ValueError):
    """Invalid training settings. `problems` lists every one, each naming the CLI flag
    (`--batch-size` is the field `batch_size`; `--help` shows the few that differ)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            listed = "".join(f"\n  - {p}" for p in self.problems)
            super().__init__(f"{len(self.problems)} problems with the settings:{listed}")


# The groups are listed last to first: a dataclass takes its bases' fields from the last base to
# the first, so the fields keep their order (run, train, eval, save, log, system), and with it the
# --help listing and the order of a training card's `config`.
@dataclass
class TrainingConfig(
    SystemSettings,
    LogSettings,
    SaveSettings,
    EvalSettings,
    TrainSettings,
    LoraSettings,
    RunSettings,
):
    """Everything one training run needs: the defaults here are the CLI's defaults.

    `warmup_steps`, `eval_every` and `zero_stage` left at None, and `max_steps` when `max_tokens`
    is set, follow the other settings; `resolved()` fills them in (`train` calls it) after
    `validate()` has checked every setting.
    """

    extra: dict = setting(default_factory=dict, cli=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        return d

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingConfig:
        """The settings a parser made by `add_config_arguments` read (not yet validated)."""
        return cls(**namespace_values(cls, args))

    def model_preset(self) -> ModelPreset:
        """The architecture to build: the preset, with --n-layer/--n-embd/--n-head applied; a
        LoRA run's is its base checkpoint's (--init-from)."""
        if self.init_from:
            return base_preset(self.init_from)
        preset = get_preset(self.preset)
        changes = {
            k: v for k in ("n_layer", "n_embd", "n_head") if (v := getattr(self, k)) is not None
        }
        if not changes:
            return preset
        shape = "x".join(str(changes.get(k, getattr(preset, k))) for k in ("n_layer", "n_embd"))
        return dataclasses.replace(preset, name=f"{preset.name}-{shape}", **changes)

    def steps_for_tokens(self, world_size: int = 1) -> int:
        """Optimizer steps that consume `max_tokens` (at least one) with `world_size` processes."""
        context = self.block_size or self.model_preset().n_positions
        per_step = self.batch_size * self.grad_accum * context * world_size
        return max(1, -(-self.max_tokens // per_step))

    def _derived(self, world_size: int) -> dict:
        """The values of the settings that follow others (see `resolved`)."""
        steps = self.max_steps if self.max_tokens is None else self.steps_for_tokens(world_size)
        warmup = self.warmup_steps
        if warmup is None:
            warmup = min(WARMUP_CAP, int(steps * WARMUP_FRACTION))
        eval_every = self.eval_every
        if eval_every is None:
            eval_every = min(EVAL_EVERY_CAP, steps // EVALS_PER_RUN)
        zero_stage = self.zero_stage
        if zero_stage is None and self.mode == "deepspeed":
            zero_stage = 2
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if native_bf16(self.device) else "fp32"
        return {
            "precision": precision,
            "max_steps": steps,
            "warmup_steps": warmup,
            "eval_every": eval_every,
            "zero_stage": zero_stage,
        }

    def problems(self, world_size: int = 1) -> list[str]:
        """Every problem with these settings (empty when valid). Cheap: it imports torch only to
        ask for CUDA when fp16 is asked for without a device."""
        found: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                found.append(message)

        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                allowed = ", ".join(map(str, choices))
                found.append(f"{cli_flag(f)} must be one of {allowed} (got {value!r})")
        need(self.batch_size >= 1, "--batch-size must be >= 1")
        need(self.grad_accum >= 1, "--grad-accum must be >= 1")
        need(self.max_steps >= 1, "--max-steps must be >= 1")
        need(self.max_tokens is None or self.max_tokens >= 1, "--max-tokens must be >= 1")
        need(self.lr > 0, "--lr must be > 0")
        need(0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]")
        need(self.weight_decay >= 0, "--weight-decay must be >= 0")
        need(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "--betas must be two numbers in [0, 1)",
        )
        need(self.grad_clip > 0, "--grad-clip must be > 0")
        need(0 <= self.dropout < 1, "--dropout must be in [0, 1)")
        need(0 < self.val_fraction < 1, "--val-fraction must be in (0, 1)")
        need(
            min(self.eval_every or 0, self.save_every, self.sample_every) >= 0,
            "--eval/save/sample-every must be >= 0",
        )
        need(self.eval_batches is None or self.eval_batches >= 1, "--eval-batches must be >= 1")
        need(
            self.save_total_limit is None or self.save_total_limit >= 1,
            "--save-total-limit must be >= 1",
        )
        need(self.num_threads is None or self.num_threads >= 1, "--threads must be >= 1")
        need(self.peak_tflops is None or self.peak_tflops > 0, "--peak-tflops must be > 0")
        need(
            self.time_limit_s is None or self.time_limit_s > EXPORT_RESERVE_S,
            f"--time-limit must leave more than the {EXPORT_RESERVE_S:.0f} s reserved for "
            "saving and export",
        )
        found += lora_problems(self)
        base_unread = bool(self.init_from) and any("--init-from" in p for p in found)
        preset = PRESETS.get(self.preset)
        if self.init_from and not base_unread:
            preset = base_preset(self.init_from)  # a LoRA run's shape and context are the base's
        for flag, value in (
            ("--n-layer", self.n_layer),
            ("--n-embd", self.n_embd),
            ("--n-head", self.n_head),
        ):
            need(value is None or value >= 1, f"{flag} must be >= 1")
        if preset is not None:
            width = self.n_embd or preset.n_embd
            heads = self.n_head or preset.n_head
            need(
                heads < 1 or width % heads == 0,
                f"the width ({width}) must be a multiple of the head count ({heads}): "
                "set --n-embd and --n-head together",
            )
        need(self.block_size is None or self.block_size >= 1, "--block-size must be >= 1")
        need(
            preset is None or self.block_size is None or self.block_size <= preset.n_positions,
            f"--block-size exceeds the {self.preset} context of {preset and preset.n_positions}",
        )
        context = self.block_size or (preset and preset.n_positions)
        need(
            self.short_context is None
            or (
                context and 1 <= self.short_context < context and context % self.short_context == 0
            ),
            f"--short-context must be shorter than the block size ({context}) and divide it",
        )
        need(0 < self.short_context_until <= 1, "--short-context-until must be in (0, 1]")
        need(
            self.vocab_size is None or self.vocab_size >= 257,
            "--vocab-size must be at least 257 (bytes + EOS)",
        )
        need(
            self.tokenizer is None or self.vocab_size is None,
            "--tokenizer and --vocab-size exclude each other",
        )
        need(
            self.tokenizer_type == "bpe" or (self.tokenizer is None and self.vocab_size is None),
            "--tokenizer-type char sizes its own vocabulary: drop --tokenizer/--vocab-size",
        )
        need(
            not (self.resume and (self.tokenizer or self.vocab_size)),
            "--resume takes the tokenizer from the checkpoint: drop --tokenizer/--vocab-size",
        )
        if self.resume and self.resume != "auto":
            need(
                (Path(self.resume) / "state.pt").is_file(),
                f"--resume {self.resume}: not a training-state checkpoint "
                f"(expected {Path(self.resume) / 'state.pt'})",
            )
        need(
            self.zero_stage is None or self.mode == "deepspeed",
            "--zero-stage needs --mode deepspeed",
        )
        for source in self.train_extra:
            need(Path(source).exists(), f"--train-extra: no {source}")
        need(
            not (self.train_extra and self.streaming),
            "--train-extra adds to a loaded corpus, not a streamed one",
        )
        need(self.join_documents >= 0, "--join-documents must be >= 0")
        need(
            not (self.join_documents and self.streaming),
            "--join-documents joins a loaded corpus, not a streamed one",
        )
        names = [spec.partition("=")[0] for spec in self.eval_data]
        for spec in self.eval_data:
            name, sep, path = spec.partition("=")
            need(
                bool(sep and name and path) and re.fullmatch(r"[\w.-]+", name) is not None,
                f"--eval-data {spec!r}: expected NAME=PATH (NAME of letters, digits, . _ -)",
            )
            need(not sep or not path or Path(path).exists(), f"--eval-data {name}: no {path}")
        need(len(set(names)) == len(names), "--eval-data names must differ")
        need(
            self.mode != "deepspeed" or _installed("deepspeed"),
            "--mode deepspeed needs the deepspeed package (see docs/train.md, 'Modes and launch lines')",
        )
        need(
            not (self.mode == "deepspeed" and self.compile),
            "--compile is not supported with --mode deepspeed",
        )
        need(
            self.optimizer != "muon" or self.mode == "baseline",
            "--optimizer muon works in --mode baseline (one process or DDP); "
            "use adamw with fsdp/deepspeed",
        )
        need(
            self.export_onnx is None or _onnx_exporter_found(self.onnx_exporter_python),
            "--export-onnx needs the ONNX exporter (optimum-onnx): `make onnx-venv` builds "
            ".venv-onnx, or name an interpreter that has it with --onnx-exporter-python "
            "(ML_ONNX_EXPORTER_PYTHON)",
        )
        need(
            self.report_to != "tensorboard" or _installed("tensorboard"),
            "--report-to tensorboard needs the tensorboard package (pip install tensorboard)",
        )
        need(
            self.report_to != "wandb" or _installed("wandb"),
            "--report-to wandb needs the wandb package (pip install wandb)",
        )
        need(
            self.precision != "fp16" or _cuda_device(self.device),
            "--fp16 needs a CUDA device; use --bf16 on CPU",
        )
        # the warm-up must fit in the run: checked on the resolved length, once that is computable
        lengths_ok = (
            preset is not None
            and not base_unread
            and self.batch_size >= 1
            and self.grad_accum >= 1
            and self.max_steps >= 1
            and (self.max_tokens is None or self.max_tokens >= 1)
            and (self.block_size is None or 1 <= self.block_size <= preset.n_positions)
        )
        if lengths_ok:
            d = self._derived(world_size)
            steps = d["max_steps"]
            source = "" if self.max_tokens is None else f" (--max-tokens gives {steps} steps)"
            source = source.replace(" 1 steps", " 1 step")
            need(
                0 <= d["warmup_steps"] < steps,
                f"--warmup-steps must be in [0, --max-steps){source}",
            )
        return found

    def validate(self, world_size: int = 1) -> None:
        """Raise `ConfigError` listing every problem (see `problems`); `world_size` processes
        share a `max_tokens` budget."""
        found = self.problems(world_size)
        if found:
            raise ConfigError(found)

    def resolved(self, world_size: int = 1) -> TrainingConfig:
        """Validated, with the settings that follow others filled in (the one place they are):

        - max_steps: from max_tokens when that is set (tokens / (batch x accum x context x
          world_size), rounded up);
        - warmup_steps: 10% of max_steps, at most 50 (50 for the default 900 steps, 0 for 6);
        - eval_every: max_steps / 6, at most 150 (150 for 900 steps; 0, only at the end, under 6);
        - zero_stage: 2 under --mode deepspeed;
        - precision auto: bf16 where the device has it natively (`native_bf16`), else fp32.

        Resolving a resolved config changes nothing."""
        self.validate(world_size)
        return dataclasses.replace(self, **self._derived(world_size))


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _onnx_exporter_found(named: str | None) -> bool:
    try:
        return Path(exporter_python(named)).exists()
    except ExportError:
        return False


def native_bf16(device: str | None) -> bool:
    """Whether the device computes in bfloat16 natively: a CUDA GPU with bf16, or a CPU with
    AVX-512 BF16 or AMX. Elsewhere (AVX2-only CPUs, Apple silicon) bf16 is emulated: a training
    step under bf16 autocast was 15 times slower than in fp32 on a 2-core AMD EPYC (BENCHMARKS.md)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def _cuda_device(device: str | None) -> bool:
    if device is not None:
        return device.startswith("cuda")
    import torch  # only here: fp16 without a device asks whether there is a GPU

    return torch.cuda.is_available()
