"""llama.cpp's `llama-server` as a system under test: built from the llama.cpp source that the PyPI
package llama-cpp-python ships, serving our checkpoint converted to GGUF (f32 or q8_0) by
llama.cpp's own converter (`python bench/llama_cpp.py build` and `convert CHECKPOINT`, or
`make llama-cpp`).

It runs with continuous batching over `--parallel N` slots (N: at least the most clients of the
run, and at least the 64 rows our server batches) and `--ctx-size` N × the context of one slot:
llama-server divides its context among the slots (`--no-kv-unified`), so each slot gets the
longest prompt of the run plus `max_tokens`, rounded up to llama.cpp's 256-token granularity and
at most the model's `n_positions`."""

from __future__ import annotations

import json
from pathlib import Path

from bench import llama_cpp  # where the build and the GGUF files are

from .base import REPETITION_PENALTY, ROOT, TOP_K, System

LLAMA_OUTTYPES = llama_cpp.OUTTYPES
SLOT_GRANULARITY = 256  # llama.cpp rounds each slot's context up to a multiple of this
DEFAULT_PARALLEL = 64  # as many slots as our server batches rows
# llama.cpp's default chain is penalties, dry, top-n-sigma, top-k, typical-p, top-p, min-p, xtc,
# temperature; this is the order ours and transformers apply (min-p, its 0.05 default, is left out)
SAMPLERS = ["penalties", "temperature", "top_k", "top_p"]


def shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def model_positions(checkpoint: Path) -> int | None:
    """The checkpoint's context length (config.json's n_positions), if it says."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if key in config:
            return int(config[key])
    return None


def slot_context(prompt_tokens: int | None, max_new: int, positions: int | None) -> int:
    """The context one slot needs: the longest prompt plus max_new, rounded up to the 256-token
    granularity llama.cpp pads to, at most the model's positions (the whole context when the
    prompts are not known); ValueError when a request could not fit the model at all."""
    if prompt_tokens is None:
        if positions is None:
            raise ValueError("neither the prompts' length nor the model's context is known")
        return positions
    need = prompt_tokens + max_new
    if positions is not None and need > positions:
        raise ValueError(
            f"{prompt_tokens} prompt tokens + {max_new} new do not fit the model's {positions}"
        )
    rounded = -(-need // SLOT_GRANULARITY) * SLOT_GRANULARITY
    return min(rounded, positions) if positions is not None else rounded


class LlamaCpp(System):
    ready_path = "/health"  # 503 while the model loads, 200 once a slot can take a request
    ready_timeout = 300.0

    def __init__(
        self,
        name: str,
        outtype: str,
        checkpoint: Path,
        device: str = "cpu",
        parallel: int = DEFAULT_PARALLEL,
        prompt_tokens: int | None = None,
        max_new: int = 64,
        server: Path = llama_cpp.SERVER,
    ):
        super().__init__()
        if outtype not in LLAMA_OUTTYPES:
            raise ValueError(f"outtype {outtype!r}: one of {LLAMA_OUTTYPES}")
        self.name, self.outtype = name, outtype
        self.checkpoint, self.device, self.server = checkpoint, device, server
        self.parallel = max(parallel, 1)
        self.slot = slot_context(prompt_tokens, max_new, model_positions(checkpoint))
        self.gguf, self.why_not = llama_cpp.ready_gguf(checkpoint, outtype)
        self.description = (
            f"llama.cpp's `llama-server` (llama-cpp-python {llama_cpp.LLAMA_CPP_PYTHON}'s source, "
            f"built here), the checkpoint converted to {outtype} GGUF, continuous batching over "
            f"{self.parallel} slots of {self.slot} tokens"
        )

    @property
    def ctx_size(self) -> int:
        return self.parallel * self.slot

    def unavailable(self) -> str | None:
        if self.device != "cpu":
            return f"{self.name} is built for the CPU only (--device {self.device})"
        if not self.server.exists():
            return f"no {shown(self.server)} (make llama-cpp)"
        return self.why_not

    def command(self, checkpoint: Path, port: int) -> list[str]:
        cmd = [str(self.server), "--model", str(self.gguf)]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--parallel", str(self.parallel), "--cont-batching", "--no-kv-unified"]
        cmd += ["--ctx-size", str(self.ctx_size)]
        # no cache of prompts across requests (the benchmark repeats its prompts; ours runs with
        # its response cache off and has no prefix cache), no web UI
        cmd += ["--cache-ram", "0", "--no-webui"]
        return cmd

    def display_command(self, checkpoint: str, port: str = "PORT") -> str:
        cmd = super().display_command(checkpoint, port)
        for path in (self.gguf, self.server):
            cmd = cmd.replace(str(path), shown(path))
        return cmd

    def thread_env(self, threads: int) -> dict[str, str]:
        # llama-server's --threads (and so --threads-batch, which follows it) from the environment
        return {"LLAMA_ARG_THREADS": str(threads)}

    def versions(self) -> str:
        version = llama_cpp.server_version(self.server).removeprefix("version: ")
        return f"llama.cpp {version} from llama-cpp-python {llama_cpp.LLAMA_CPP_PYTHON}'s sdist"

    def extensions(self, max_new: int) -> dict:
        """llama-server ignores fields it does not know (`repetition_penalty` would be dropped
        silently): its names are `repeat_penalty` over the last `repeat_last_n` tokens (the
        prompt's included; one slot's whole context, as transformers penalizes every token so
        far), `ignore_eos` (EOS's logit at -inf) and `samplers` for the order."""
        if self.greedy:  # temperature 0 is llama.cpp's argmax too
            return {"ignore_eos": True, "cache_prompt": False}
        return {
            "top_k": TOP_K,
            "repeat_penalty": REPETITION_PENALTY,
            "repeat_last_n": self.slot,
            "samplers": SAMPLERS,
            "ignore_eos": True,
            "cache_prompt": False,
        }

    def extensions_note(self) -> str:
        if self.greedy:
            return (
                super().extensions_note()
                + " (`cache_prompt: false` and `--cache-ram 0`: every prompt is computed, as in ours)"
            )
        return (
            super().extensions_note()
            + " (llama.cpp's names for top-k 50 and the repetition penalty 1.1 over the whole "
            "context; `samplers` puts its chain in transformers' order, penalty, temperature, "
            "top-k, top-p, leaving out its min-p 0.05 default; `seed` seeds its own generator, "
            "so sampled tokens differ from ours for the same seed; `cache_prompt: false` and "
            "`--cache-ram 0`: every prompt is computed, as in ours)"
        )
