"""The ONNX exporter: Hugging Face's `optimum-onnx`, run as a subprocess in its own interpreter.

That exporter pins `transformers<4.58` while the product runs transformers 5, so it lives in its
own environment (`make onnx-venv` builds `.venv-onnx`). This module finds that interpreter and
runs it; `lib/export_onnx.py` checks what it wrote. It is a leaf (no torch, nothing of `lib` but
the repository's root), so the training settings can ask whether an exporter is installed
(`--onnx`) without importing the export and the serving code behind it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from lib.presets import REPO_ROOT

EXPORTER_VENV = REPO_ROOT / ".venv-onnx"  # `make onnx-venv`
EXPORTER_PACKAGES = ("optimum-onnx", "optimum", "transformers", "torch", "onnx")


class ExportError(RuntimeError):
    """The exporter is missing or failed, or the exported model does not match PyTorch."""


def exporter_python(named: str | None = None) -> str:
    """The interpreter that runs optimum-onnx: the one the caller `named` (the command lines'
    --exporter-python / --onnx-exporter-python, which default to $ML_ONNX_EXPORTER_PYTHON), else
    `.venv-onnx`'s, else this one if it has the exporter."""
    if named:
        if not Path(named).exists():
            raise ExportError(
                f"the ONNX exporter's interpreter {named} does not exist (named by "
                "--exporter-python or ML_ONNX_EXPORTER_PYTHON)"
            )
        return named
    venv = EXPORTER_VENV / "bin" / "python"
    if venv.exists():
        return str(venv)
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.exporters.onnx"):
        return sys.executable
    raise ExportError(
        "the ONNX exporter (optimum-onnx) is not installed: `make onnx-venv` builds .venv-onnx "
        "with it (it pins transformers<4.58, so it lives apart from the product's environment)"
    )


def exporter_versions(python: str) -> dict:
    code = (
        "import json, importlib.metadata as m\n"
        f"names = {list(EXPORTER_PACKAGES)!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def run_exporter(
    checkpoint: Path, out: Path, python: str, opset: int | None = None, optimize: str | None = None
) -> None:
    """optimum-onnx's `export onnx` for text generation with the KV cache, into `out`
    (`optimize`: its ONNX Runtime graph optimization level, O1-O3)."""
    cmd = [python, "-m", "optimum.commands.optimum_cli", "export", "onnx"]
    cmd += ["--model", str(checkpoint), "--task", "text-generation-with-past"]
    if opset is not None:
        cmd += ["--opset", str(opset)]
    if optimize is not None:
        cmd += ["--optimize", optimize]
    cmd.append(str(out))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not (out / "model.onnx").is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise ExportError(f"optimum-onnx failed to export {checkpoint.name}:\n{tail}")
