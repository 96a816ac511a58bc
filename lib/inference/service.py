"""`InferenceService`: one loaded model + tokenizer, generating for a prompt or a batch.

The HTTP layer talks to `lib` only through this class: `prepare` checks and tokenizes a prompt
(`prepare_ids` checks one given as token ids), `prompt_logprobs` scores a prompt's tokens (OpenAI's
`echo` with `logprobs`), `create_engine` gives the continuous-batching engine that serves
concurrent requests (`engine.py`), and `generate_batch` runs a fixed batch directly (library use).
Every use of the model is serialised by one lock: the model is one set of CPU/GPU cores, and a
batch uses them better than concurrent calls would.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lib import __version__
from lib.checkpoint import (
    checkpoint_sha256,
    load_model,
    onnx_model_file,
    read_card,
    resolve_backend,
    served_directory,
)
from lib.inference.contract import EngineObserver
from lib.inference.engine import GenerationEngine
from lib.inference.limits import (
    ADAPTER_MB,
    ENGINE_MAX_BATCH_SIZE,
    ENGINE_MAX_QUEUE,
    ENGINE_MAX_WAIT_S,
)
from lib.inference.offline import generate, run_to_end
from lib.inference.onnx_model import OnnxCausalLM
from lib.inference.prompts import check_fits, check_tokens, encode_prompts
from lib.inference.quantization import check_quantization, quantization_of, quantize
from lib.inference.registry import LoadSpec
from lib.inference.scoring import (
    TextScore,
    check_scorable,
    check_scorable_ids,
    score_texts,
    token_logprobs,
)
from lib.inference.types import (
    GenerationFailed,
    GenerationParams,
    GenerationResult,
    InvalidTokens,
    PreparedPrompt,
    PromptTooLong,
    TokenLogprob,
)
from lib.modeling import TRAINING_FIGURES, build_model, count_parameters
from lib.presets import DEFAULT_CHECKPOINT, get_preset
from lib.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class InferenceService:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_id: str,
        source: str,
        card: dict | None = None,
        random_baseline: bool = False,
        checkpoint_sha256: str | None = None,
        device: str | None = None,
        runtime: dict | None = None,
    ):
        self.model = model.eval()
        self._device = device  # where the weights run, when they are not here (meta)
        self._runtime = runtime  # what runs them, when it is not this model (ONNX elsewhere)
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.source = source  # where it was loaded from (a server path: never in metadata())
        self.checkpoint_sha256 = checkpoint_sha256
        self.card = card or {}
        self.random_baseline = random_baseline
        self._lock = threading.Lock()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: LoadSpec, /, *, weights: bool = True, **extra) -> InferenceService:
        """The model `spec` names (lib/checkpoint.py), run by torch or by ONNX Runtime. Without
        `weights`: the tokenizer, the checkpoint's identity and the model's shape only (its
        weights on torch's meta device: no memory), which is what the server's process holds
        when the engine loads the weights itself (its own process, vLLM). `extra` goes to the
        constructor (a subclass's own arguments)."""
        if spec.random_preset:
            return cls._random(spec.random_preset, spec, weights=weights, **extra)
        path = Path(spec.checkpoint or DEFAULT_CHECKPOINT)
        dtype = getattr(torch, spec.dtype)
        served = served_directory(path, spec.backend, spec.device, dtype)
        onnx = resolve_backend(path, spec.backend) == "onnxruntime"
        t0 = time.perf_counter()
        runtime = None
        onnx_precision = "int8" if spec.quantization == "int8" else "fp32"  # the ONNX file
        if not onnx:  # a clear error for a device or dtype int8 cannot serve, before loading
            check_quantization(spec.quantization, spec.device, spec.dtype)
        if onnx and weights:
            model = OnnxCausalLM(served, onnx_precision, threads=spec.threads)
        elif onnx or not weights:
            if onnx:  # missing: the error here, before an engine starts
                file = onnx_model_file(path, onnx_precision).name
                runtime = {
                    "backend": "onnxruntime",
                    "precision": onnx_precision,
                    "model_file": file,
                }
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(served)))
            model = model.to(dtype)
            if not onnx:  # what the engine's process serves (runtime() reports it)
                model.serving_quantization = spec.quantization
        else:
            model = quantize(load_model(path, device=spec.device, dtype=dtype), spec.quantization)
        tokenizer = load_tokenizer(served)
        card = read_card(served) or read_card(path)
        sha256 = checkpoint_sha256(served)  # once per load
        log.info("loaded %s (sha256 %s) in %.2fs", served, sha256, time.perf_counter() - t0)
        return cls(
            model,
            tokenizer,
            model_id=card.get("model_id") or path.name,
            source=str(path),
            card=card,
            checkpoint_sha256=sha256,
            device=None if weights else spec.device,
            runtime=runtime,
            **extra,
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path = DEFAULT_CHECKPOINT,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        quantization: str = "none",
        threads: int | None = None,
    ) -> InferenceService:
        """The checkpoint at `path`, run by torch or by ONNX Runtime (`backend`: `auto` serves
        an ONNX-only directory with ONNX Runtime); `quantization` "int8" runs torch's int8
        products (quantization.py) or picks the int8 ONNX file, and `threads` sets ONNX
        Runtime's math threads (torch's are the engine's to set)."""
        dtype_name = str(dtype or torch.float32).removeprefix("torch.")
        spec = LoadSpec(str(path), None, device, dtype_name, backend, quantization, threads)
        return cls.from_spec(spec)

    @classmethod
    def random_baseline(
        cls, preset: str = "tiny", tokenizer_path: str | Path = DEFAULT_CHECKPOINT, seed: int = 0
    ) -> InferenceService:
        """A randomly initialised preset: a speed/plumbing baseline that produces gibberish."""
        return cls._random(preset, LoadSpec(random_preset=preset), tokenizer_path, seed)

    @classmethod
    def _random(
        cls,
        preset: str,
        spec: LoadSpec,
        /,
        tokenizer_path: str | Path = DEFAULT_CHECKPOINT,
        seed: int = 0,
        weights: bool = True,
        **extra,
    ) -> InferenceService:
        tokenizer = load_tokenizer(tokenizer_path)
        shape = get_preset(preset)
        vocab = max(len(tokenizer), shape.vocab_size)
        with torch.device("meta" if not weights else "cpu"):
            model = build_model(
                shape, vocab_size=vocab, eos_token_id=tokenizer.eos_token_id, seed=seed
            )
        if weights:
            log.warning("serving a RANDOMLY INITIALISED %s model: its output is noise", preset)
        return cls(
            model.to(getattr(torch, spec.dtype)) if not weights else model,
            tokenizer,
            model_id=f"random-{preset}",
            source=f"random:{preset}",
            card={"preset": preset},
            random_baseline=True,
            device=None if weights else spec.device,
            **extra,
        )

    # -- properties ---------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return int(self.model.config.n_positions)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return torch.device(self._device)
        return self.model.device

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) - 1 for ids in encode_prompts(self.tokenizer, texts)]

    def prepare(self, prompt: str, params: GenerationParams) -> PreparedPrompt:
        """Token ids for the engine, or PromptTooLong (never truncated) before any model work."""
        ids = encode_prompts(self.tokenizer, [prompt])
        check_fits(ids, [params], self.context_length)
        check_tokens(ids, [params], self.vocab_size)  # the logit_bias ids
        return PreparedPrompt(ids[0], params)

    def prepare_ids(self, ids: Sequence[int], params: GenerationParams) -> PreparedPrompt:
        """`prepare` for a prompt given as token ids (without the leading end-of-document token,
        which this adds): InvalidTokens for an id outside [0, vocab_size) (in the prompt or in
        `params.logit_bias`), PromptTooLong when it does not fit, before any model work."""
        full = [self.tokenizer.eos_token_id, *self._token_ids(ids)]
        check_tokens([full], [params], self.vocab_size)
        check_fits([full], [params], self.context_length)
        return PreparedPrompt(full, params)

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0) -> list[TokenLogprob | None]:
        """The log-probability of each prompt token (ids, without the leading end-of-document
        token) given those before it, with its `top` best alternatives: what OpenAI's `echo`
        returns, so the first entry is None (it has no tokens before it). The numbers are
        `score`'s (the prompt behind the leading end-of-document token, in one forward pass).
        InvalidTokens / PromptTooLong (more than context_length - 1 tokens) before any model
        work; runs holding the model's lock."""
        full = [self.tokenizer.eos_token_id, *self._token_ids(ids)]
        check_tokens([full], [GenerationParams()], self.vocab_size)
        check_scorable_ids([full], self.context_length)
        if top < 0:
            raise ValueError(f"top must be >= 0, not {top}")
        if len(full) == 1:
            return []
        scored = self._locked(token_logprobs, self.model, [full], min(top, self.vocab_size))[0]
        return [None, *scored[1:]]

    @staticmethod
    def _token_ids(ids: Sequence[int]) -> list[int]:
        try:
            return [operator.index(t) for t in ids]
        except TypeError as e:
            raise InvalidTokens(f"token ids must be integers ({e})") from None

    def create_engine(
        self,
        max_batch_size: int = ENGINE_MAX_BATCH_SIZE,
        max_wait_s: float = ENGINE_MAX_WAIT_S,
        max_queue: int = ENGINE_MAX_QUEUE,
        observer: EngineObserver | None = None,
        threads: int | None = None,
        prefix_cache_mb: int = 0,
        adapters: Sequence[tuple[str, str]] = (),
        adapter_mb: int = ADAPTER_MB,
    ) -> GenerationEngine:
        """The continuous-batching engine over this model (start() it; it shares the lock).
        `threads`: CPU threads for its math (default: every core the process may use);
        `prefix_cache_mb`: memory for the KV of cached prompt prefixes (0: none); `adapters`:
        LoRA adapters to load, (name, directory) pairs, within `adapter_mb` (adapters.py)."""
        return GenerationEngine(
            self.model,
            self.tokenizer,
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
            lock=self._lock,
            observer=observer,
            threads=threads,
            prompt_scorer=self.prompt_logprobs,
            prefix_cache_mb=prefix_cache_mb,
            adapters=adapters,
            adapter_mb=adapter_mb,
            base_sha256=self.checkpoint_sha256,
        )

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompt: str, params: GenerationParams | None = None) -> GenerationResult:
        return self.generate_batch([prompt], params)[0]

    def generate_batch(
        self,
        prompts: Sequence[str],
        params: GenerationParams | Sequence[GenerationParams] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[GenerationResult]:
        """One result per prompt, in order. `params` is shared or one per prompt."""
        if params is None or isinstance(params, GenerationParams):
            params = [params or GenerationParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} parameter sets")
        # generate() refuses a prompt that does not fit (PromptTooLong) before any model work
        return self._locked(generate, self.model, self.tokenizer, prompts, params, should_stop)

    def generate_prepared(self, items: Sequence[PreparedPrompt]) -> list[GenerationResult]:
        """`generate_batch` for prompts already checked and tokenized by `prepare`."""
        return self._locked(
            run_to_end,
            self.model,
            self.tokenizer,
            [i.ids for i in items],
            [i.params for i in items],
        )

    def check_scorable(self, texts: Sequence[str]) -> None:
        check_scorable(self.tokenizer, texts, self.context_length)

    def score(self, texts: Sequence[str]) -> list[TextScore]:
        """Per-token log-probabilities of each text (see lib.inference.scoring)."""
        # score_texts() refuses a text that does not fit (PromptTooLong) before any model work
        return self._locked(score_texts, self.model, self.tokenizer, texts)

    def _locked(self, fn, *args):
        """`fn(*args)` holding the model; a failure on valid input becomes GenerationFailed."""
        with self._lock:
            try:
                return fn(*args)
            except (PromptTooLong, InvalidTokens):
                raise
            except Exception as e:  # any failure inside the model on valid input
                log.exception("%s failed", fn.__name__)
                raise GenerationFailed(str(e)) from e

    # -- metadata -----------------------------------------------------------------------------
    def checkpoint(self) -> dict | None:
        """The checkpoint by name and content hash (None for a random baseline): never its path."""
        if self.random_baseline:
            return None
        return {"name": Path(self.source).name, "sha256": self.checkpoint_sha256}

    def runtime(self) -> dict:
        """What runs the model: `backend` (torch or onnxruntime), `precision` (the weights' dtype,
        int8 for torch's int8 products, or the ONNX file's fp32/int8) and `model_file` (its name,
        never a path)."""
        if self._runtime is not None:
            return dict(self._runtime)
        model = self.model
        if getattr(model, "backend", "torch") == "onnxruntime":
            return {
                "backend": "onnxruntime",
                "precision": model.precision,
                "model_file": model.file.name,
            }
        weights = "model.safetensors" if not self.random_baseline else None
        precision = str(model.dtype).removeprefix("torch.")
        if quantization_of(model) != "none":
            precision = quantization_of(model)
        return {"backend": "torch", "precision": precision, "model_file": weights}

    def metadata(self) -> dict:
        """What /metadata shows about the model. `source` is the checkpoint's directory name (or
        `random:<preset>`), not the server path it was loaded from."""
        cfg = self.model.config
        card = self.card
        checkpoint = self.checkpoint()
        return {
            "model_id": self.model_id,
            "source": checkpoint["name"] if checkpoint else self.source,
            "checkpoint": checkpoint,
            "random_baseline": self.random_baseline,
            "warning": (
                "RANDOMLY INITIALISED WEIGHTS: this model was not trained and produces noise"
                if self.random_baseline
                else None
            ),
            "architecture": cfg.architectures[0]
            if cfg.architectures
            else type(self.model).__name__,
            "preset": card.get("preset") or getattr(cfg, "preset", None),
            "parameters": count_parameters(self.model),
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.n_embd,
            "context_length": self.context_length,
            "vocab_size": cfg.vocab_size,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device": str(self.device),
            **self.runtime(),
            "training": {k: card[k] for k in TRAINING_FIGURES if k in card},
            "lib_version": __version__,
        }
