#!/usr/bin/env python
"""Train a GPT-2-family model from scratch and export a Hugging Face-format checkpoint, or
fine-tune a LoRA adapter on an existing one.

    python train_distributed.py --preset tiny --max-steps 900 --output-dir runs/baseline
    python train_distributed.py --output-dir runs/baseline --resume auto     # continue a stopped run
    python train_distributed.py --init-from models/default --lora-rank 16 --data my.txt  # LoRA

The checkpoint lands in OUTPUT_DIR/final; serve it with `make serve-trained CHECKPOINT=OUTPUT_DIR/final`.
Resumable training state is kept in OUTPUT_DIR/checkpoints/step-NNNNNNN.
Every option is a field of lib.training.config.TrainingConfig (same defaults and checks from
Python); --warmup-steps and --eval-every follow --max-steps unless given. W&B reads
WANDB_PROJECT and WANDB_MODE here (online when WANDB_API_KEY is set, else offline), and
--onnx-exporter-python ML_ONNX_EXPORTER_PYTHON; flags override them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

# light imports only: the arguments are parsed and checked before torch/transformers load
from lib.cli import add_config_arguments, parse_count, parse_duration
from lib.training.config import ConfigError, TrainingConfig, launched_world_size

__all__ = ["build_parser", "config_from_args", "main", "parse_count", "parse_duration"]


def environment_defaults(environ: Mapping[str, str]) -> dict:
    """The settings the CLI takes from the environment (its flags override them): W&B's
    project and mode (online with an API key, else offline, so a run never prompts), and the
    ONNX exporter's interpreter."""
    found = {}
    if environ.get("WANDB_PROJECT"):
        found["wandb_project"] = environ["WANDB_PROJECT"]
    if environ.get("WANDB_MODE"):
        found["wandb_mode"] = environ["WANDB_MODE"]
    elif environ.get("WANDB_API_KEY"):
        found["wandb_mode"] = "online"
    if environ.get("ML_ONNX_EXPORTER_PYTHON"):
        found["onnx_exporter_python"] = environ["ML_ONNX_EXPORTER_PYTHON"]
    return found


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The options, one per `TrainingConfig` field (lib/training/settings.py: defaults and help;
    lib/training/config.py: checks)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(p, TrainingConfig)
    p.add_argument(
        "--estimate-memory",
        nargs="?",
        type=int,
        const=0,
        metavar="DEVICES",
        help="print the run's estimated memory per device (weights, gradients, optimizer states, "
        "activations, logits) for DEVICES devices (default: this launch's processes) and exit",
    )
    p.set_defaults(**environment_defaults(os.environ if environ is None else environ))
    return p


def config_from_args(args: argparse.Namespace, world_size: int | None = None) -> TrainingConfig:
    """The validated, resolved settings (ConfigError lists every problem) before any data or
    model is touched. `world_size`: the processes of the run (default: torchrun's WORLD_SIZE)."""
    if world_size is None:
        world_size = launched_world_size(os.environ)
    return TrainingConfig.from_args(args).resolved(world_size)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.estimate_memory is not None:
        from lib.training.memory import estimate_memory

        devices = args.estimate_memory or launched_world_size(os.environ)
        print(f"{config.preset}, mode {config.mode}, {devices} device(s):")
        print(estimate_memory(config, world_size=devices).table())
        return 0
    from lib.training import train  # heavy imports only after the arguments are valid
    from lib.training.loop import NonFiniteLoss

    try:
        result = train(config)
    except ConfigError as e:  # found once the data or the base model is read, before any step
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.stop_reason != "max_steps":
        print(
            f"stopped early ({result.stop_reason}); resume with: --output-dir {config.output_dir} --resume auto"
        )
    return 0


def exit_now(code: int) -> None:
    """Flush and leave without the interpreter's teardown. After a complete run (checkpoint
    written, process group destroyed), objects that still hold gloo's process group (FSDP's and
    DeepSpeed's) are destroyed during interpreter finalisation, where gloo's worker threads can
    abort the process ("terminate called without an active exception", SIGABRT): 3 of 35
    two-process ZeRO-3 runs on two busy cores did, each after "main returned" on both ranks.
    torchrun then reports the whole run as failed."""
    import logging
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
