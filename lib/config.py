"""Model presets and training settings, as data.

A preset fixes the architecture of a GPT-2-family model. `TrainingConfig` is the one place where a
training setting, its default, its help text and its checks live: `train_distributed.py` generates
its command line from the fields (`add_config_arguments`), and `lib.training.train` validates and
resolves the same object (`TrainingConfig.resolved`) before any work.

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
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "default"
EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class ModelPreset:
    """Architecture of a GPT-2-family causal LM."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    description: str

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def approx_parameters(self) -> int:
        """Parameter count of GPT-2 with tied input/output embeddings (exact for `build_model`)."""
        d, L = self.n_embd, self.n_layer
        per_block = 12 * d * d + 13 * d  # attention (4d^2+4d) + MLP (8d^2+5d) + 2 LayerNorms (4d)
        embeddings = self.vocab_size * d + self.n_positions * d
        return L * per_block + embeddings + 2 * d  # + final LayerNorm


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        # The embedded default: trained in 11.5 minutes on 2 CPU cores (`make train-baseline`).
        ModelPreset(
            "tiny",
            n_layer=4,
            n_head=4,
            n_embd=192,
            n_positions=256,
            vocab_size=8192,
            description="embedded default, 3.4M parameters, trains in 11 minutes on 2 CPU cores",
        ),
        # The OpenAI GPT-2 family sizes (vocabulary of 50,257 as in the original).
        ModelPreset("gpt2-124m", 12, 12, 768, 1024, 50257, "GPT-2 small"),
        ModelPreset("gpt2-350m", 24, 16, 1024, 1024, 50257, "GPT-2 medium"),
        ModelPreset("gpt2-774m", 36, 20, 1280, 1024, 50257, "GPT-2 large"),
        ModelPreset("gpt2-1.5b", 48, 25, 1600, 1024, 50257, "GPT-2 XL"),
        # ~1.0B with a Russian 50k vocabulary padded to a multiple of 128; heads of size 128 keep
        # attention matmuls efficient on tensor cores, 24 layers keep the model shallow and wide.
        ModelPreset(
            "gpt2-1b",
            24,
            14,
            1792,
            2048,
            50304,
            "1.0B, 24 layers x 1792 wide, 14 heads of 128, 50,304-token Russian vocabulary",
        ),
    ]
}


def launched_world_size(environ: Mapping[str, str]) -> int:
    """Processes of the run, from the launcher's environment (torchrun's WORLD_SIZE; 1 without
    torchrun): they share a `max_tokens` budget."""
    return int(environ.get("WORLD_SIZE", "1"))


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


MODES = ("baseline", "fsdp", "deepspeed")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "linear", "constant")
TOKENIZER_TYPES = ("bpe", "char")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
REPORT_TO = ("none", "wandb", "tensorboard")
WANDB_MODES = ("online", "offline", "disabled")
EXPORT_RESERVE_S = 30.0  # a time-limited run stops this long before the end to evaluate and save
# defaults that follow the run's length (TrainingConfig.resolved)
WARMUP_FRACTION, WARMUP_CAP = 0.1, 50  # warm-up: 10% of the steps, at most 50
EVALS_PER_RUN, EVAL_EVERY_CAP = 6, 150  # validation about 6 times a run, at least every 150 steps


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


# Parsers of command-line text (a field's `parse`): ValueError when the text is malformed.

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """'3h30m', '90m', '45s' or plain seconds -> seconds."""
    m = _DURATION.match(text.strip())
    if not text.strip() or not m or not any(m.groups()):
        raise ValueError(f"bad duration {text!r}; use e.g. 3h30m, 90m, 600s or 600")
    h, mnt, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mnt * 60 + s


def parse_count(text: str) -> int:
    """'2.5M', '10B', '300k' or a plain number -> an integer."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMbB]?)", text.strip())
    if not m:
        raise ValueError(f"bad count {text!r}; use e.g. 300k, 2.5M, 10B or 5000000")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()])


def parse_optional_path(text: str) -> Path | None:
    """A path, or 'none' (the feature is off)."""
    return None if text.strip().lower() == "none" else Path(text)


def setting(
    default=dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    choices: tuple | None = None,
    parse: Callable[[str], object] | None = None,
    metavar: str | None = None,
    aliases: dict[str, tuple[object, str]] | None = None,
    cli: bool = True,
    default_factory=dataclasses.MISSING,
):
    """A `TrainingConfig` field with its help text, allowed values and command-line form.

    flag: the option's name (default `--field-name`); parse: text -> value for the command line
    (default: the field's type); aliases: extra flags that set a fixed value (`--bf16` for
    precision bf16), mutually exclusive with the flag; cli=False: not on the command line."""
    metadata = {
        "help": help,
        "flag": flag,
        "choices": choices,
        "parse": parse,
        "metavar": metavar,
        "aliases": aliases or {},
        "cli": cli,
    }
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class TrainingConfig:
    """Everything one training run needs: the defaults here are the CLI's defaults.

    `warmup_steps`, `eval_every` and `zero_stage` left at None, and `max_steps` when `max_tokens`
    is set, follow the other settings; `resolved()` fills them in (`train` calls it) after
    `validate()` has checked every setting.
    """

    # what to train, on what, where
    preset: str = setting("tiny", "model size (lib/config.py)", choices=tuple(PRESETS))
    mode: str = setting(
        "baseline",
        "baseline: one process, or DDP when launched by torchrun; fsdp: FSDP2 sharding; "
        "deepspeed: ZeRO (launch both with torchrun or deepspeed)",
        choices=MODES,
    )
    zero_stage: int | None = setting(
        None, "DeepSpeed ZeRO stage (--mode deepspeed only; default 2)", choices=(1, 2, 3)
    )
    data: str = setting(
        "bundled",
        "'bundled' (Russian corpus), a .txt/.jsonl file or directory, or a `datasets` name",
    )
    train_extra: tuple[str, ...] = setting(
        (),
        "more training text, added to the training split only (a .txt/.jsonl file or "
        "directory; `make corpus` writes the Wesnoth and fortunes ones): the validation split "
        "stays --data's, so its figure stays comparable; repeat for more",
        metavar="SOURCE",
    )
    join_documents: int = setting(
        0,
        "join consecutive training documents (in corpus order) into passages of up to this many "
        "characters, separated by a space instead of the end-of-text token, so that a short "
        "sentence is not always followed by the end of a text (0: each document alone; the "
        "validation split stays as it is)",
        metavar="CHARS",
    )
    eval_data: tuple[str, ...] = setting(
        (),
        "a named held-out set, NAME=PATH (.txt/.jsonl file or directory), evaluated with the "
        "validation split (bits/byte in the log and the training card); training documents that "
        "contain one of its texts are dropped (not when streaming); repeat for more",
        metavar="NAME=PATH",
    )
    streaming: bool = setting(
        False,
        "stream --data (a local .txt/.jsonl or a `datasets` name) in one pass instead of "
        "loading it whole",
    )
    output_dir: Path = setting(
        Path("runs/baseline"),
        "run directory: OUTPUT_DIR/final (export) and OUTPUT_DIR/checkpoints (training state)",
    )
    run_name: str | None = setting(
        None,
        "model id recorded in the checkpoint and the W&B run name (default: the output "
        "directory's name)",
    )
    resume: str | None = setting(
        None,
        "'auto' (newest complete checkpoint in OUTPUT_DIR, or a fresh start) or a checkpoint path",
    )
    tokenizer: str | None = setting(
        None,
        "existing tokenizer directory (default: train a new one); the model's vocabulary is "
        "sized to it",
    )
    tokenizer_type: str = setting(
        "bpe",
        "the tokenizer trained on the training split: bpe (byte-level BPE of --vocab-size "
        "tokens) or char (one token per character, UTF-8 bytes for the rest; the vocabulary is "
        "sized to it)",
        choices=TOKENIZER_TYPES,
    )
    cache_dir: Path | None = setting(
        Path(".cache/tokens"),
        "memory-mapped token cache, keyed by tokenizer and data ('none' disables)",
        parse=parse_optional_path,
        metavar="DIR",
    )
    vocab_size: int | None = setting(
        None, "vocabulary of a newly trained tokenizer (default: the preset's)"
    )
    block_size: int | None = setting(None, "training context length (default: the preset's)")
    short_context: int | None = setting(
        None,
        "train on rows this long (each block cut into pieces: the same tokens per step) for the first "
        "part of the run, then at the full block size; must divide it",
    )
    short_context_until: float = setting(
        0.75, "the share of the run (of its time budget, or else of its steps) at --short-context"
    )
    n_layer: int | None = setting(None, "transformer blocks (default: the preset's)")
    n_embd: int | None = setting(
        None, "model width, a multiple of the head count (default: the preset's)"
    )
    n_head: int | None = setting(None, "attention heads (default: the preset's)")
    val_fraction: float = setting(0.05, "share of the documents held out for validation")

    # optimisation
    batch_size: int = setting(8, "sequences per micro-batch (per process)")
    grad_accum: int = setting(
        1, "micro-batches per optimizer step (loss-equivalent to a bigger batch)"
    )
    optimizer: str = setting(
        "adamw",
        "adamw, or muon: Muon on the transformer's weight matrices, AdamW on the rest",
        choices=OPTIMIZERS,
    )
    lr: float = setting(3e-3, "peak learning rate")
    min_lr_ratio: float = setting(0.1, "final LR as a fraction of the peak")
    weight_decay: float = setting(0.1, "decay on the blocks' weight matrices (AdamW's or Muon's)")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW's betas", metavar="BETA")
    grad_clip: float = setting(1.0, "gradient-norm clipping threshold")
    scheduler: str = setting(
        "cosine", "LR schedule after warm-up (wsd = warmup-stable-decay)", choices=SCHEDULES
    )
    warmup_steps: int | None = setting(
        None,
        f"linear warm-up steps (default: {WARMUP_FRACTION:.0%} of --max-steps, at most "
        f"{WARMUP_CAP}: {WARMUP_CAP} for 900 steps, 0 for 6)",
    )

    # length of the run
    max_steps: int = setting(900, "optimizer steps (with --time-limit: the most it may take)")
    max_tokens: int | None = setting(
        None,
        "token budget instead of --max-steps (e.g. 2.5M, 10B): "
        "steps = tokens / (batch x accum x context x processes)",
        parse=parse_count,
        metavar="COUNT",
    )
    time_limit_s: float | None = setting(
        None,
        "wall-clock budget (e.g. 3h30m, 11m): the LR anneals by then; save, export and exit 0 "
        "before it ends",
        flag="--time-limit",
        parse=parse_duration,
        metavar="DURATION",
    )

    # evaluation, checkpoints, reporting
    eval_every: int | None = setting(
        None,
        f"validation every N steps, 0: only at the end (default: --max-steps / {EVALS_PER_RUN}, "
        f"at most {EVAL_EVERY_CAP}: {EVAL_EVERY_CAP} for 900 steps, 0 under {EVALS_PER_RUN})",
    )
    eval_batches: int | None = setting(
        None, "validation batches per evaluation during training (default: the whole split)"
    )
    save_every: int = setting(
        0, "training-state checkpoint every N steps (0: only on an early stop)"
    )
    save_total_limit: int | None = setting(3, "training-state checkpoints kept (the newest)")
    sample_every: int = setting(
        0, "log sample continuations every N steps (0: only in the training card)"
    )
    export_onnx: str | None = setting(
        None,
        "after the run, export OUTPUT_DIR/final to ONNX in OUTPUT_DIR/final/onnx, checked "
        "against PyTorch (int8: also model.int8.onnx; the exporter lives in .venv-onnx: "
        "`make onnx-venv`)",
        flag="--onnx",
        choices=("fp32", "int8"),
        aliases={"--export-onnx": ("fp32", "same as --onnx fp32")},
    )
    onnx_exporter_python: str | None = setting(
        None,
        "the Python interpreter that has the ONNX exporter (optimum-onnx) for --export-onnx "
        "(default: .venv-onnx's, else this one if it has the exporter; the CLI takes "
        "$ML_ONNX_EXPORTER_PYTHON when set)",
        metavar="PYTHON",
    )
    report_to: str = setting("none", "metrics sink (wandb: see --wandb-mode)", choices=REPORT_TO)
    wandb_project: str = setting("ru-gpt", "W&B project (the CLI takes $WANDB_PROJECT when set)")
    wandb_mode: str = setting(
        "offline",
        "W&B mode: offline logs to OUTPUT_DIR/wandb without ever prompting (upload later with "
        "`wandb sync`); the CLI takes $WANDB_MODE when set, else online when WANDB_API_KEY is set",
        choices=WANDB_MODES,
    )
    peak_tflops: float | None = setting(
        None, "the device's dense peak TFLOP/s for MFU (detected for A100/H100/H200)"
    )

    # hardware and numerics
    device: str | None = setting(None, "torch device (default: cuda when available, else cpu)")
    precision: str = setting(
        "fp32",
        "autocast precision; auto: bf16 where the device computes in it natively (CUDA with bf16, "
        "CPUs with AVX-512 BF16 or AMX), else fp32",
        choices=PRECISIONS,
        aliases={
            "--bf16": ("bf16", "bfloat16 autocast (GPUs with bf16, recent CPUs)"),
            "--fp16": ("fp16", "float16 autocast with a gradient scaler (CUDA only)"),
        },
    )
    gradient_checkpointing: bool = setting(
        False, "recompute activations in backward to save memory"
    )
    compile: bool = setting(False, "torch.compile the model")
    dropout: float = setting(0.0, "dropout probability")
    seed: int = setting(1337, "seed for init, data order and sampling")
    num_threads: int | None = setting(
        None, "torch CPU threads (default: torch's choice)", flag="--threads", metavar="N"
    )
    progress: bool = setting(True, "progress bar")
    extra: dict = setting(default_factory=dict, cli=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        return d

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingConfig:
        """The settings a parser made by `add_config_arguments` read (not yet validated)."""
        values = {}
        for f in dataclasses.fields(cls):
            if hasattr(args, f.name):
                value = getattr(args, f.name)
                if value is None and f.default == ():  # a repeatable option never given
                    continue
                values[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def model_preset(self) -> ModelPreset:
        """The architecture to build: the preset, with --n-layer/--n-embd/--n-head applied."""
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
        context = self.block_size or PRESETS[self.preset].n_positions
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
        preset = PRESETS.get(self.preset)
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
            "--mode deepspeed needs the deepspeed package (see HOW_TO_USE.md, 'Modes')",
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
    from lib.export_onnx import ExportError, exporter_python

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


# The command line, generated from the fields.


def cli_flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _value_type(hint) -> tuple[type, int | str | None]:
    """(element type, nargs) of a field's annotation: `int | None` -> (int, None); a
    `tuple[str, ...]` is a repeatable option (nargs "append")."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return args[0], "append" if args[-1] is Ellipsis else len(args)
    return (args[0] if len(args) == 1 else hint), None


def _command_line_parser(parse: Callable[[str], object]) -> Callable[[str], object]:
    """`parse` for argparse: its ValueError message becomes the command-line error."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type = TrainingConfig
) -> argparse.ArgumentParser:
    """One option per field of `cls` (help, choices, flag name and parser from the metadata).
    Booleans get --name/--no-name; the parsed namespace feeds `cls.from_args`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        m = f.metadata
        if not m.get("cli", True):
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        value_type, nargs = _value_type(hints[f.name])
        help_text = m.get("help", "").replace("%", "%%")
        kw: dict = {"dest": f.name, "default": default}
        if value_type is bool:
            kw["action"] = argparse.BooleanOptionalAction
            help_text += f" (default: {'on' if default else 'off'})"
        else:
            parse = m.get("parse")
            kw["type"] = _command_line_parser(parse) if parse else value_type
            if nargs == "append":
                kw["action"], kw["default"] = "append", None  # from_args: None -> the default
            elif nargs:
                kw["nargs"] = nargs
            if m.get("choices"):
                kw["choices"] = m["choices"]
            if m.get("metavar"):
                kw["metavar"] = m["metavar"]
            if default is not None:
                help_text += " (default: %(default)s)"
        kw["help"] = help_text
        target = parser
        if m.get("aliases"):
            target = parser.add_mutually_exclusive_group()
        target.add_argument(cli_flag(f), **kw)
        for alias, (value, alias_help) in m.get("aliases", {}).items():
            target.add_argument(
                alias, dest=f.name, action="store_const", const=value, help=alias_help
            )
    return parser
