"""LoRA fine-tuning with peft: the base checkpoint loaded and frozen, its target modules checked,
the adapter attached, the user's text read and its last documents held out.

`build_training_artifacts` (lib/training/setup.py) calls these when `--lora-rank` is set, and the
run then goes through the same loop, callbacks, state checkpoints and evaluation as any other;
lib/training/lora_export.py writes the adapter directory (or, with `--merge`, the merged
checkpoint) at the end. The settings' checks that need no model are lib/training/lora_checks.py.
peft is imported by the functions that need it, so a run without LoRA never loads it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lib.checkpoint import checkpoint_sha256, load_model, read_card
from lib.data import load_documents, local_text_files
from lib.training.config import ConfigError, TrainingConfig
from lib.training.lora_checks import lora_targets

ADAPTABLE = ("Linear", "Conv1D")  # the layer types LoRA adapts here (transformers' Conv1D: GPT-2)
WEIGHTS_FILE = "model.safetensors"


@dataclass
class LoraBase:
    """What a LoRA run knows of its base and its data: identities (content hashes) and the base's
    figures on the held-out text before any training."""

    path: str
    sha256: str  # lib.checkpoint.checkpoint_sha256: the hash a server reports for the checkpoint
    weights_sha256: str  # sha256 of model.safetensors alone
    model_id: str | None  # the base's training card's
    data_sha256: str
    base_parameters: int
    # `evaluate` of the base on the held-out split and each --eval-data set, before training
    before: dict = field(default_factory=dict)
    trainable_parameters: int = 0

    def state(self) -> dict:
        """What a training-state checkpoint keeps of it (a resumed run checks its base)."""
        return asdict(self)


def sha256_of(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, or of a directory's .txt/.jsonl files (each name and bytes, in
    sorted order)."""
    path = Path(path)
    files = local_text_files(path) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        if path.is_dir():
            digest.update(f"{f.relative_to(path)}\0".encode())
        with f.open("rb") as stream:
            while chunk := stream.read(chunk_bytes):
                digest.update(chunk)
    return digest.hexdigest()


def _sniff_jsonl(path: Path) -> bool:
    """Whether a file of another extension holds JSON lines (its first non-empty line is an
    object), else it is read as plain text."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except json.JSONDecodeError:
                    return False
    return False


def read_documents(source: str) -> list[str]:
    """The documents of a LoRA run's --data: `bundled`, a .txt file (one document per non-empty
    line), a .jsonl file (one object with a string `text` per line), a file of another extension
    (JSON lines when its first line is an object, else text) or a directory of .txt/.jsonl
    files. An empty source, or a JSON line without a string `text`, is a `ConfigError` that says
    where."""
    path = Path(source)
    if source != "bundled" and path.is_file() and path.suffix not in (".txt", ".jsonl"):
        docs = _read_jsonl(path) if _sniff_jsonl(path) else _read_text(path)
    elif path.suffix == ".jsonl" and path.is_file():
        docs = _read_jsonl(path)
    else:
        try:
            docs = load_documents(source)
        except ValueError as e:
            raise ConfigError([f"--data {source}: {e}"]) from None
    if not docs:
        raise ConfigError([f"--data {source}: no text (no non-empty document)"])
    return docs


def _read_text(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            text = None
        if not isinstance(text, str):
            raise ConfigError(
                [f"--data {path}, line {n}: expected a JSON object with a string 'text' field"]
            )
        if text.strip():
            docs.append(text)
    return docs


def split_heldout_tail(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): the last `fraction` of the documents, at least
    one, in their order, are held out and never trained on. A tail rather than a hash split keeps
    whole stretches of the source (a manual page's paragraphs, a book's chapters) on one side."""
    n_heldout = max(1, round(len(docs) * fraction))
    if len(docs) - n_heldout < 1:
        raise ConfigError(
            [
                f"--data has {len(docs)} document(s): too few to hold out the last "
                f"{fraction:.0%} and train on the rest (one document per non-empty line)"
            ]
        )
    return docs[:-n_heldout], docs[-n_heldout:]


def load_base(config: TrainingConfig, device: torch.device) -> torch.nn.Module:
    """The base checkpoint's model (--init-from) on `device`, in training mode."""
    model = load_model(config.init_from, device=device)
    if config.gradient_checkpointing:  # non-reentrant: the frozen inputs need no gradient
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def check_targets(model: torch.nn.Module, targets: list[str], base: str) -> list[str]:
    """The qualified names of the modules `targets` select (peft's rule: the name itself, or a
    name that ends with `.target`). `ConfigError` for a target that selects nothing, or a layer
    LoRA does not adapt here, listing the names that would do."""
    modules = dict(model.named_modules())
    adaptable = sorted(
        {n.rsplit(".", 1)[-1] for n, m in modules.items() if type(m).__name__ in ADAPTABLE}
        - {"lm_head"}
    )
    problems, selected = [], []
    for t in targets:
        found = [n for n in modules if n == t or n.endswith("." + t)]
        kinds = {type(modules[n]).__name__ for n in found}
        if not found:
            problems.append(
                f"--lora-targets {t}: the base model {base} has no module of that name; "
                f"its adaptable ones: {', '.join(adaptable)}"
            )
        elif not kinds <= set(ADAPTABLE) or any(n == "lm_head" for n in found):
            problems.append(
                f"--lora-targets {t}: selects {', '.join(sorted(kinds))} layers; LoRA adapts "
                f"the blocks' linear layers: {', '.join(adaptable)}"
            )
        selected += found
    if problems:
        raise ConfigError(problems)
    return selected


def lora_config(config: TrainingConfig, model: torch.nn.Module):
    """peft's `LoraConfig` for a run. GPT-2's projections are transformers' Conv1D, whose weight
    is stored (in, out): `fan_in_fan_out` is set for them (peft would warn and set it)."""
    from peft import LoraConfig

    targets = lora_targets(config)
    selected = check_targets(model, targets, config.init_from)
    modules = dict(model.named_modules())
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha or 2 * config.lora_rank,
        target_modules=targets,
        lora_dropout=config.lora_dropout,
        fan_in_fan_out=all(type(modules[n]).__name__ == "Conv1D" for n in selected),
        bias="none",
        task_type="CAUSAL_LM",
    )


def adapt(model: torch.nn.Module, config: TrainingConfig) -> torch.nn.Module:
    """The base wrapped by peft (`get_peft_model`): its weights frozen, an adapter on each target
    (A random, B zero: the wrapped model computes what the base does until B moves). The seed is
    the run's, so A's draw repeats."""
    from peft import get_peft_model

    torch.manual_seed(config.seed)
    with warnings.catch_warnings():  # peft asks transformers a deprecated name (v6 renames it)
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        peft_model = get_peft_model(model, lora_config(config, model))
    # what adapter_config.json records as its base: the path the run was given
    peft_model.peft_config["default"].base_model_name_or_path = str(config.init_from)
    return peft_model


def describe_base(config: TrainingConfig, base: torch.nn.Module) -> LoraBase:
    """The base's and the data's identities (the figures come later)."""
    return LoraBase(
        path=str(config.init_from),
        sha256=checkpoint_sha256(config.init_from),
        weights_sha256=sha256_of(Path(config.init_from) / WEIGHTS_FILE),
        model_id=read_card(config.init_from).get("model_id"),
        data_sha256=sha256_of(config.data) if config.data != "bundled" else "bundled",
        base_parameters=sum(p.numel() for p in {id(p): p for p in base.parameters()}.values()),
    )


def check_resumed_base(saved: dict, base: LoraBase, resume: Path) -> None:
    """A training state resumes only on the base (and kind of run) it was trained from."""
    kept = saved.get("lora")
    if kept is None:
        raise ConfigError(
            [f"--resume {resume}: a full training run's state, not a LoRA run's (--lora-rank)"]
        )
    if kept["sha256"] != base.sha256:
        raise ConfigError(
            [
                f"--resume {resume}: its adapter was trained on the base {kept['path']} "
                f"(sha256 {kept['sha256'][:12]}), but --init-from {base.path} is another "
                f"checkpoint (sha256 {base.sha256[:12]}); resume with the same base"
            ]
        )
