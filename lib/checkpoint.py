"""The checkpoint directory: the contract between training and serving, read and written here only.

A checkpoint is a Hugging Face-format directory: config.json, generation_config.json,
model.safetensors, the tokenizer files, a training card (training_card.json + README.md) and,
after `make export-onnx`, an ONNX export in `onnx/`. This module resolves one (which files serve
it with which backend), hashes its content, reads its card, loads its torch weights and saves a
new one atomically. Training saves through it, serving loads through it, and the ONNX exporter
hashes through it, so the three agree on what a checkpoint is.

What a server loads from a checkpoint, and how it runs it, is `lib.inference.LoadSpec`
(`InferenceService.from_spec` reads it through this module). torch and transformers are imported
by the functions that read or write weights only, so resolving and hashing stay light.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig

CARD_FILE = "training_card.json"
ONNX_DIR = "onnx"  # where `make export-onnx` writes, inside the checkpoint directory
ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}  # precision -> file
BACKENDS = ("auto", "torch", "onnxruntime")

# The files that decide what a checkpoint computes (weights, architecture, tokenizer, generation
# defaults); its card and README describe it and stay out of its content hash.
CHECKPOINT_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.onnx",  # an ONNX export (lib/export_onnx.py) served by ONNX Runtime
)


# -- resolving ------------------------------------------------------------------------------------
def onnx_dir(path: str | Path) -> Path | None:
    """The directory holding the ONNX export of the checkpoint at `path`: `path` itself when it
    has an ONNX model (an ONNX-only directory), else its `onnx/` subdirectory when that has one."""
    path = Path(path)
    for candidate in (path, path / ONNX_DIR):
        if any((candidate / f).is_file() for f in ONNX_FILES.values()):
            return candidate
    return None


def has_torch_weights(path: str | Path) -> bool:
    path = Path(path)
    return any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))


def resolve_backend(path: str | Path, backend: str = "auto") -> str:
    """`torch` or `onnxruntime` for the checkpoint at `path`: `auto` picks torch where there are
    torch weights and ONNX Runtime for a directory that only has an ONNX model."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend != "auto":
        return backend
    if not has_torch_weights(path) and onnx_dir(path) is not None:
        return "onnxruntime"
    return "torch"


def onnx_model_file(path: str | Path, precision: str = "fp32") -> Path:
    """The ONNX file that serves the checkpoint at `path` in `precision`, or FileNotFoundError
    that says how to make it."""
    if precision not in ONNX_FILES:
        raise ValueError(
            f"ONNX precision must be one of {', '.join(ONNX_FILES)}, not {precision!r}"
        )
    found = onnx_dir(path)
    file = (found or Path(path) / ONNX_DIR) / ONNX_FILES[precision]
    if not file.is_file():
        how = "make export-onnx CHECKPOINT=<dir>" + (" INT8=1" if precision == "int8" else "")
        raise FileNotFoundError(
            f"no {precision} ONNX model for checkpoint {Path(path).name!r} "
            f"(expected {ONNX_DIR}/{ONNX_FILES[precision]}); export it with `{how}`"
        )
    return file


def served_directory(
    path: str | Path, backend: str = "auto", device: str = "cpu", dtype: torch.dtype | None = None
) -> Path:
    """The directory whose files serve the checkpoint at `path` with `backend`: `path` for torch,
    its ONNX export's directory for ONNX Runtime. FileNotFoundError / ValueError say what is
    missing or not supported, before anything loads."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no checkpoint at {path} (expected config.json, model.safetensors, tokenizer files)"
        )
    if resolve_backend(path, backend) == "torch":
        return path
    if str(device) != "cpu" or str(dtype).removeprefix("torch.") not in ("None", "float32"):
        raise ValueError(
            "the onnxruntime backend runs fp32 (or its int8 file) on the CPU here; on a GPU or in "
            "bfloat16 serve with the torch or vllm engine (docs/extend.md, ONNX)"
        )
    return onnx_dir(path) or path / ONNX_DIR


# -- identity -------------------------------------------------------------------------------------
def checkpoint_files(path: str | Path) -> list[Path]:
    """The content files of the checkpoint at `path`, in a fixed (sorted) order."""
    path = Path(path)
    found = {f for pattern in CHECKPOINT_FILE_PATTERNS for f in path.glob(pattern) if f.is_file()}
    return sorted(found, key=lambda f: f.name)


def checkpoint_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """A SHA-256 over the checkpoint's content files (each file's name, size and bytes, streamed
    in chunks): the same files give the same hash wherever the directory is."""
    digest = hashlib.sha256()
    for f in checkpoint_files(path):
        digest.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with f.open("rb") as stream:
            while chunk := stream.read(chunk_bytes):
                digest.update(chunk)
    return digest.hexdigest()


def read_card(path: str | Path) -> dict:
    f = Path(path) / CARD_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}


# -- loading and saving ---------------------------------------------------------------------------
def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
):
    """The torch model (a `GPT2LMHeadModel`) of the checkpoint at `path`, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype or torch.float32, attn_implementation="sdpa"
    )
    return model.to(device).eval()


def save_checkpoint(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | Path,
    card: dict,
    *,
    generation_config: GenerationConfig,
    readme: str,
) -> Path:
    """Write a complete HF-format checkpoint atomically (temp dir + rename); return its path.
    The writer gives the generation defaults and the README (lib/training/card.py: they follow
    the serving defaults, which live above this module)."""
    from lib.modeling import unwrap_model

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model = unwrap_model(model)
        model.generation_config = generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CARD_FILE).write_text(
            json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        install_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def install_directory(tmp: Path, out_dir: Path) -> None:
    """Put the finished directory `tmp` (a sibling of `out_dir`) in place of `out_dir`: its files
    synced, its mode the umask's (mkdtemp makes it 0700), then renamed; an old `out_dir` is
    renamed away first and removed only after. A reader sees the old directory or the new one,
    never a mixture."""
    _fsync_dir(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
