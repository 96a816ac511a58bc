"""The engines by name: `ENGINES` maps each `ML_SERVICE_ENGINE` value to its class.

Settings validation, engine creation, /metadata and the docs' settings table read this table, so
adding an engine is one new module (a subclass of `contract.Engine` with `create`) and one
`ENGINES.register(...)` line below (or in a plugin, before the app is built). Entries name their
class as "module:Class" and import it on first use: the table itself imports no torch, and vLLM
(optional) is imported only when it is chosen.

`EngineSpec` is what every engine is built from: what to load (`LoadSpec`, shared by the server's
process and an engine's own process) and how to batch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from lib.inference.contract import Engine
from lib.inference.limits import (
    ADAPTER_MB,
    ENGINE_MAX_BATCH_SIZE,
    ENGINE_MAX_QUEUE,
    ENGINE_MAX_WAIT_S,
    PREFIX_CACHE_MB,
)

QUANTIZATIONS = ("none", "int8")  # serving precisions (ML_SERVICE_QUANTIZATION)


def check_quantization(quantization: str, device: str, dtype: str) -> None:
    """ValueError naming the reason where `quantization` cannot serve on `device` in `dtype`."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}"
        )
    if quantization == "int8":
        if not str(device).startswith("cpu"):
            raise ValueError(
                f"int8 quantization serves on CPUs (device {device!r}): on a GPU serve bfloat16, "
                "or vLLM (ML_SERVICE_ENGINE=vllm) with its own quantized formats"
            )
        if dtype != "float32":
            raise ValueError(
                f"int8 quantization keeps float32 activations: set dtype float32, not {dtype}"
            )


@dataclass(frozen=True)
class LoadSpec:
    """What to load: a checkpoint directory (lib/checkpoint.py resolves it), or a randomly
    initialised preset (a baseline), and how it runs. Picklable: the engine's process receives it
    as it is, so the server's process (tokenizer and shape) and the engine's (weights) load from
    the same spec."""

    checkpoint: str | None = None  # a checkpoint directory, or
    random_preset: str | None = None  # a randomly initialised preset (baseline only)
    device: str = "cpu"
    dtype: str = "float32"
    backend: str = "auto"  # torch or onnxruntime (see resolve_backend)
    quantization: str = (
        "none"  # or int8: torch's int8 products (quantization.py), the int8 ONNX file
    )
    threads: int | None = None  # ONNX Runtime's math threads (torch's are the engine's to set)


@dataclass(frozen=True)
class EngineSpec:
    """What an engine loads and how it batches (all picklable: an engine process receives it)."""

    load: LoadSpec = field(default_factory=LoadSpec)
    max_batch_size: int = ENGINE_MAX_BATCH_SIZE
    max_wait_s: float = ENGINE_MAX_WAIT_S
    max_queue: int = ENGINE_MAX_QUEUE
    threads: int | None = None  # the engine's math threads (default: every core)
    tensor_parallel: int = 1  # GPUs one model is split over (vLLM)
    warmup: bool = True
    standby: bool = True  # the process engine keeps a spare process ready for a restart
    prefix_cache_mb: int = PREFIX_CACHE_MB  # KV of cached prompt prefixes; 0: no prefix cache
    # LoRA adapters loaded at start, (name, directory) pairs, within adapter_mb of memory
    adapters: tuple[tuple[str, str], ...] = ()
    adapter_mb: int = ADAPTER_MB


@dataclass(frozen=True)
class EngineEntry:
    name: str
    target: str  # "package.module:Class"
    summary: str  # one line for the settings' description and the docs
    generates: bool = True  # a text-generation engine (a choice for ML_SERVICE_ENGINE)

    def load(self) -> type[Engine]:
        module, _, attr = self.target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, Engine)):
            raise TypeError(f"engine {self.name!r} is {cls!r}, not a lib.inference.Engine")
        return cls


class EngineRegistry:
    def __init__(self) -> None:
        self._entries: dict[str, EngineEntry] = {}

    def register(self, name: str, target: str, summary: str, *, generates: bool = True) -> None:
        """Add (or replace) the engine `name`, the class at `target` ("module:Class")."""
        self._entries[name] = EngineEntry(name, target, summary, generates)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> type[Engine]:
        """The class registered as `name` (imported now); KeyError that lists the names."""
        if name not in self._entries:
            raise KeyError(f"unknown engine {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name].load()

    def entry(self, name: str) -> EngineEntry:
        return self._entries[name]

    def names(self, generates: bool | None = None) -> list[str]:
        """Registered names in order (`generates`: only the text-generation engines, or only the
        others)."""
        return [
            e.name for e in self._entries.values() if generates is None or e.generates == generates
        ]

    def describe(self, generates: bool = True) -> str:
        """ "`name` (summary), ..." for the settings' description and the docs."""
        return ", ".join(
            f"`{e.name}` ({e.summary})" for e in self._entries.values() if e.generates == generates
        )


ENGINES = EngineRegistry()
ENGINES.register(
    "process",
    "lib.inference.engine_process.client:EngineProcess",
    "our continuous-batching engine in a process of its own: the HTTP side and the decode loop "
    "share no GIL; a crashed engine is restarted",
)
ENGINES.register(
    "thread",
    "lib.inference.engine:GenerationEngine",
    "our engine in a thread of the server process",
)
ENGINES.register(
    "vllm",
    "lib.inference.vllm_engine:VLLMEngine",
    "vLLM's async engine: needs vLLM installed; GPU fleets, tensor parallelism",
)
ENGINES.register(
    "micro-batch",
    "lib.inference.micro_batch:MicroBatcher",
    "a generic micro-batcher over a service's `predict` (services other than text generation)",
    generates=False,
)
