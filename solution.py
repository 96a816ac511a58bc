#!/usr/bin/env python
"""Compatibility layer: the public API in one import, and an ASGI app.

    uvicorn solution:app                      # serve the embedded default model
    python solution.py "Привет, мир!"         # generate locally, no server (see --help)

Re-exports: create_app, Settings, InferenceService, GenerationParams, GenerationEngine (the
continuous-batching engine, from `InferenceService.create_engine()`), TrainingConfig, train.
"""

from __future__ import annotations

import argparse
import sys

from lib.export_onnx import export_onnx
from lib.inference import EngineSpec, GenerationEngine, GenerationParams, InferenceService
from lib.inference.engine_process.client import EngineProcess
from lib.inference.onnx_model import OnnxCausalLM
from lib.presets import DEFAULT_CHECKPOINT, PRESETS
from lib.training import train
from lib.training.config import TrainingConfig
from ml_service.backend.app import create_app
from ml_service.settings import Settings, get_settings


def __getattr__(name: str):
    # `uvicorn solution:app` builds the app on first access, so importing this module stays cheap
    if name == "app":
        return create_app()
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Generate a continuation locally with a checkpoint (no server)."
    )
    p.add_argument(
        "text", nargs="*", default=["Привет, мир!"], help="prompt(s); default: Привет, мир!"
    )
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="checkpoint directory")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    service = InferenceService.from_checkpoint(args.checkpoint)
    params = GenerationParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    for prompt, result in zip(args.text, service.generate_batch(args.text, params), strict=True):
        print(f"{prompt}{result.text}  [{result.finish_reason}, {result.completion_tokens} tokens]")
    return 0


__all__ = [
    "PRESETS",
    "EngineProcess",
    "EngineSpec",
    "GenerationEngine",
    "GenerationParams",
    "InferenceService",
    "OnnxCausalLM",
    "Settings",
    "TrainingConfig",
    "create_app",
    "export_onnx",
    "get_settings",
    "main",
    "train",
]

if __name__ == "__main__":
    sys.exit(main())
