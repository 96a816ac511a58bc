"""Resumable training state: the data position, and atomic training-state checkpoints.

A state checkpoint is a directory `OUTPUT_DIR/checkpoints/step-NNNNNNN/` holding `state.pt` (model,
optimizer, step, tokens, data position, RNG states, history) and the tokenizer. It is written to a
hidden temporary directory and renamed into place, so a process killed mid-save leaves no broken
checkpoint; resuming picks the newest complete one. The data position is restored directly (the
epoch's permutation and a cursor), never by replaying the data loader.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class DataCursor:
    """Where training is in the data: a seeded permutation per epoch and a position in it."""

    n_blocks: int
    generator: torch.Generator
    order: torch.Tensor
    cursor: int = 0
    epoch: int = 0

    @classmethod
    def start(cls, n_blocks: int, seed: int) -> DataCursor:
        gen = torch.Generator().manual_seed(seed)
        return cls(n_blocks, gen, torch.randperm(n_blocks, generator=gen))

    def next_indices(self, batch_size: int) -> torch.Tensor:
        if batch_size > self.n_blocks:
            raise ValueError(
                f"batch of {batch_size} is larger than the {self.n_blocks} training blocks"
            )
        if self.cursor + batch_size > self.n_blocks:
            self.order, self.cursor, self.epoch = (
                torch.randperm(self.n_blocks, generator=self.generator),
                0,
                self.epoch + 1,
            )
        idx = self.order[self.cursor : self.cursor + batch_size]
        self.cursor += batch_size
        return idx

    def state_dict(self) -> dict:
        return {
            "order": self.order,
            "cursor": self.cursor,
            "epoch": self.epoch,
            "generator": self.generator.get_state(),
            "n_blocks": self.n_blocks,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["n_blocks"] != self.n_blocks:
            raise ValueError(
                f"checkpoint was made with {state['n_blocks']} training blocks, the data now has "
                f"{self.n_blocks}: resume with the same data, tokenizer and block size"
            )
        self.order, self.cursor, self.epoch = state["order"], state["cursor"], state["epoch"]
        self.generator.set_state(state["generator"])


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_training_state(
    output_dir: str | Path,
    step: int,
    state: dict,
    tokenizer,
    keep: int | None = None,
    tmp: Path | None = None,
) -> Path:
    """Write `state` (+ the tokenizer) atomically as checkpoints/step-NNNNNNN; prune to `keep` newest."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = tmp or Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.tmp-", dir=root))
    try:
        torch.save(state, tmp / STATE_FILE)
        tokenizer.save_pretrained(tmp)
        for f in (p for p in tmp.rglob("*") if p.is_file()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step saved twice (a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete state checkpoints, oldest first (temporary directories of interrupted saves are skipped)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def remove_interrupted_saves(output_dir: str | Path) -> int:
    root = checkpoints_dir(output_dir)
    stale = [p for p in root.glob(".step-*.tmp-*")] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def load_training_state(path: str | Path) -> dict:
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete training-state checkpoint (no {STATE_FILE})"
        )
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
