"""The checks of a LoRA run's settings (`LoraSettings`, lib/training/settings.py) that need no
model, and the base checkpoint's shape read from its config.json. `TrainingConfig.problems` lists
these with the others; the checks that need the base model's modules run when it loads, before
any step (lib/training/lora.py). Imports no torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lib.presets import ModelPreset


def lora_targets(config) -> list[str]:
    """--lora-targets as names (comma-separated, blanks ignored)."""
    return [t.strip() for t in config.lora_targets.split(",") if t.strip()]


def lora_problems(config) -> list[str]:
    """The LoRA settings' problems (those that need the base model's modules are checked
    when it loads, before any step: lib/training/lora.py)."""
    found: list[str] = []
    if config.lora_rank is None:
        for flag, given in (("--init-from", config.init_from), ("--merge", config.merge)):
            if given:
                found.append(f"{flag} needs --lora-rank (a LoRA adapter is what it trains)")
        return found
    if not config.init_from:
        return ["--lora-rank needs --init-from CHECKPOINT (the base model to adapt)"]
    base = Path(config.init_from)
    if not (base / "config.json").is_file() or not (base / "model.safetensors").is_file():
        found.append(
            f"--init-from {base}: not a checkpoint directory (expected config.json and "
            "model.safetensors)"
        )
    elif json.loads((base / "config.json").read_text("utf-8")).get("model_type") != "gpt2":
        found.append(f"--init-from {base}: not a GPT-2 checkpoint (config.json model_type)")
    data = Path(config.data)
    if config.data != "bundled" and not data.exists():
        found.append(f"--data {data}: no such file or directory (a LoRA run reads local text)")
    elif data.is_file() and not data.read_bytes()[: 1 << 20].strip():
        found.append(f"--data {data}: the file is empty")
    if config.lora_rank < 1:
        found.append(f"--lora-rank must be >= 1 (got {config.lora_rank})")
    if config.lora_alpha is not None and config.lora_alpha <= 0:
        found.append(f"--lora-alpha must be > 0 (got {config.lora_alpha})")
    if not 0 <= config.lora_dropout < 1:
        found.append("--lora-dropout must be in [0, 1)")
    targets = lora_targets(config)
    if not targets:
        found.append("--lora-targets names no module")
    for t in targets:
        if not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", t):
            found.append(f"--lora-targets {t!r}: not a module name")
    if len(set(targets)) != len(targets):
        found.append("--lora-targets names a module twice")
    taken_from_base = (
        ("--tokenizer", config.tokenizer),
        ("--vocab-size", config.vocab_size),
        ("--tokenizer-type char", config.tokenizer_type == "char"),
        ("--n-layer", config.n_layer),
        ("--n-embd", config.n_embd),
        ("--n-head", config.n_head),
    )
    for flag, given in taken_from_base:
        if given:
            found.append(f"{flag}: a LoRA run takes its tokenizer and shape from --init-from")
    if config.dropout:
        found.append("--dropout: the base's weights are frozen; use --lora-dropout")
    if config.streaming:
        found.append("--streaming: a LoRA run holds out the last documents of a loaded --data")
    if config.optimizer != "adamw":
        found.append("--optimizer muon: a LoRA run trains its adapter with adamw")
    if config.export_onnx and not config.merge:
        found.append("--export-onnx needs --merge (an adapter alone is not a model)")
    return found


def base_preset(path: str | Path) -> ModelPreset:
    """The shape of the GPT-2 checkpoint at `path` (its config.json) as a preset."""
    cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return ModelPreset(
        name=cfg.get("preset") or Path(path).name,
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        n_embd=cfg["n_embd"],
        n_positions=cfg["n_positions"],
        vocab_size=cfg["vocab_size"],
        description=f"the base checkpoint {path}",
    )
