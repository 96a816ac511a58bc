"""An exported ONNX model (`lib/export_onnx.py`) run by ONNX Runtime under our engine.

The exported graph is Hugging Face's "with past" GPT-2 decoder: it takes `input_ids`,
`attention_mask`, `position_ids` and every layer's past keys and values, and returns the logits and
the *present* keys and values, which are the past with the new positions appended. Our engine keeps
its KV cache in slots (`decoder.SlotCache`: row i of the running batch in slot i, each row at its
own position), so `OrtSlotDecoder` hands the graph the slots' first P columns as the past, P being
the furthest row's position, and lets the attention mask say which columns each row may see
(those before its own position, and the new one). The new token's keys and values come out as the
last column of `present`; they are written back into each row's slot at its own position. So
continuous batching, per-row sampling, seeds, cancellation and streaming are the engine's own
(`generation.DecodeBatch`), whatever runs the model.

What this layout costs: the exporter's graph concatenates, so every step copies the whole past
into `present` (and the past's P columns are first copied out of the slots, since ONNX Runtime
reads contiguous arrays only): the cache moves three times where our torch decoder reads it once.
Binding pre-allocated output buffers (IO binding) measured no faster here (ONNX Runtime's CPU arena
already reuses them). BENCHMARKS.md ("ONNX Runtime") has the numbers.

ONNX Runtime runs here on the CPU only: our cache lives in torch CPU tensors handed to the session
as NumPy views (no copy). On a GPU, serve the checkpoint with the torch or vLLM engine, or give the
exported model to a runtime built for it (Triton's ONNX Runtime backend with the TensorRT or CUDA
execution provider: docs/extend.md, "ONNX").
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from lib.checkpoint import onnx_model_file
from lib.inference.decoder import SlotCache, UnsupportedModel
from lib.inference.limits import default_math_threads

log = logging.getLogger(__name__)


class OnnxModelError(ValueError):
    """An ONNX file that ONNX Runtime cannot load, or whose inputs and outputs do not match the
    checkpoint's config.json (a corrupt or mismatched export)."""


def session_options(threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting between steps: the engine's own Python work shares these cores (spinning
    # measured 16-rows throughput halved on 2 cores)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OnnxCausalLM:
    """An ONNX export of a GPT-2-family checkpoint, with the surface of `GPT2LMHeadModel` that
    serving uses: `config`, `device`, `dtype`, `num_parameters()`, `model(input_ids=...,
    attention_mask=...).logits` (scoring and echo log-probabilities), and `slot_decoder()` for
    the continuous-batching engine."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoConfig

        self.file = onnx_model_file(path, precision)
        self.precision = precision
        self.config = AutoConfig.from_pretrained(str(self.file.parent))
        if getattr(self.config, "model_type", None) != "gpt2":
            raise UnsupportedModel(
                f"the engine decodes GPT-2-family models (model_type 'gpt2'); "
                f"got {getattr(self.config, 'model_type', None)!r}"
            )
        self.threads = threads or default_math_threads()
        try:
            self.session = ort.InferenceSession(
                str(self.file),
                session_options(self.threads),
                providers=["CPUExecutionProvider"],
            )
        except Exception as e:  # onnxruntime raises its own classes for every kind of bad file
            raise OnnxModelError(
                f"{self.file.name} is not a model ONNX Runtime can load ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300]})"
            ) from None
        self._check_signature()
        self.device = torch.device("cpu")
        self.dtype = torch.float32  # the activations; int8 quantizes the matrices only
        self.layers = int(self.config.n_layer)
        self._outputs = ["logits"] + [
            f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")
        ]

    def _check_signature(self) -> None:
        cfg = self.config
        heads, head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        want = {"input_ids", "attention_mask", "position_ids"} | {
            f"past_key_values.{i}.{kv}" for i in range(cfg.n_layer) for kv in ("key", "value")
        }
        problems = []
        if missing := sorted(want - inputs.keys()):
            problems.append(f"inputs missing: {', '.join(missing[:4])}")
        if extra := sorted(k for k in inputs if k.startswith("past_key_values.") and k not in want):
            problems.append(f"{len(extra)} past inputs beyond the config's {cfg.n_layer} layers")
        past = inputs.get("past_key_values.0.key")
        if past is not None and [past[1], past[3]] != [heads, head_dim]:
            problems.append(f"past shape {past} is not (batch, {heads}, past, {head_dim})")
        logits = outputs.get("logits")
        if logits is None:
            problems.append("no logits output")
        elif isinstance(logits[-1], int) and logits[-1] != cfg.vocab_size:
            problems.append(f"logits over {logits[-1]} tokens, not the config's {cfg.vocab_size}")
        if problems:
            raise OnnxModelError(
                f"{self.file.name} does not match the checkpoint's config.json: "
                + "; ".join(problems)
            )

    # -- the GPT2LMHeadModel surface ------------------------------------------------------------
    def eval(self) -> OnnxCausalLM:
        return self

    def num_parameters(self) -> int:
        """The source model's parameter count (from its config: int8 stores the same ones),
        counted once: /metadata asks for it on every request."""
        return self._parameters

    @cached_property
    def _parameters(self) -> int:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config)
        return model.num_parameters()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        """Logits of every position of right-padded rows (no past): what scoring needs."""
        ids = input_ids.cpu().numpy().astype(np.int64)
        n, length = ids.shape
        mask = (
            np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy()
        ).astype(np.int64)
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(length), (n, length)))
        logits, _ = self.run(ids, mask, positions, self.empty_past(n))
        return SimpleNamespace(logits=torch.from_numpy(logits))

    # -- the graph --------------------------------------------------------------------------------
    def empty_past(self, rows: int) -> list[np.ndarray]:
        cfg = self.config
        empty = np.zeros((rows, cfg.n_head, 0, cfg.n_embd // cfg.n_head), np.float32)
        return [empty] * (2 * self.layers)

    def run(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of the graph: logits (rows, new, vocab) and each layer's present key and
        value (rows, heads, past + new, head_dim), keys then values, layer by layer."""
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        logits, *present = self.session.run(self._outputs, feed)
        return logits, present

    def slot_decoder(self) -> OrtSlotDecoder:
        return OrtSlotDecoder(self)


def _only_whole(cached, lora) -> None:
    if (cached and any(cached)) or lora is not None:
        raise ValueError("ONNX Runtime's decoder runs whole prompts, without adapters")


class OrtSlotDecoder(SlotCache):
    """`GPT2SlotDecoder`'s interface (prefill, decode, the slot cache) over an `OnnxCausalLM`."""

    def __init__(self, model: OnnxCausalLM):
        cfg = model.config
        self.model = model
        self.device, self.dtype = torch.device("cpu"), torch.float32
        super().__init__(cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_positions)

    def _cache(self, rows, width: int) -> list[np.ndarray]:
        """Keys then values of each layer's first `width` positions for `rows`, as the graph's
        past: the slots in place (no copy) when `rows` is a slice and `width` the whole cache,
        else a contiguous copy of just those columns (ONNX Runtime reads contiguous arrays only;
        copying the columns in use measured faster than handing over the whole cache, whose
        every column the graph then copies into `present`)."""
        out = []
        for cache in (t for pair in zip(self.k, self.v, strict=True) for t in pair):
            part = cache[rows] if width == self.length else cache[rows, :, :width]
            out.append(part.contiguous().numpy())
        return out

    @torch.inference_mode()
    def prefill(
        self, prompts: list[list[int]], first_slot: int, cached=None, lora=None
    ) -> torch.Tensor:
        """Run whole prompts (one per new slot, from `first_slot` on); logits of their last tokens.
        The graph runs whole prompts only, without adapters: `cached` and `lora` (the slot
        decoder's seam, decoder.py) must be empty here (this decoder leaves `prefix_cacheable`
        unset, so the batch's prefix cache and adapters are off)."""
        _only_whole(cached, lora)
        n, P = len(prompts), max(len(p) for p in prompts)
        self.reserve(first_slot + n, P)
        ids = np.zeros((n, P), np.int64)
        mask = np.zeros((n, P), np.int64)  # right padding: no key past a row's own prompt
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
            mask[i, : len(p)] = 1
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(P), (n, P)))
        logits, present = self.model.run(ids, mask, positions, self.model.empty_past(n))
        rows = slice(first_slot, first_slot + n)
        for layer in range(self.layers):
            self.k[layer][rows, :, :P] = torch.from_numpy(present[2 * layer])
            self.v[layer][rows, :, :P] = torch.from_numpy(present[2 * layer + 1])
        lens = np.array([len(p) for p in prompts])
        return torch.from_numpy(logits[np.arange(n), lens - 1])

    @torch.inference_mode()
    def decode(
        self, ids: torch.Tensor, positions: list[int], slots=None, lora=None
    ) -> torch.Tensor:
        """`GPT2SlotDecoder.decode`: logits (B, vocab) of one new token per row (no adapters)."""
        _only_whole(None, lora)
        B = len(positions)
        pos = np.asarray(positions, dtype=np.int64)
        L = int(pos.max())  # the widest row's cached positions: columns past it hold nothing
        past = self._cache(slice(0, B) if slots is None else torch.tensor(slots), L)
        mask = np.zeros((B, L + 1), np.int64)
        mask[:, :L] = np.arange(L)[None, :] < pos[:, None]  # what each row has cached
        mask[:, L] = 1  # and the new token, which the graph appends as column L
        new_ids = ids.reshape(B, 1).numpy().astype(np.int64)
        logits, present = self.model.run(new_ids, mask, pos[:, None].copy(), past)
        rows = torch.arange(B) if slots is None else torch.tensor(slots)
        at = torch.from_numpy(pos)
        for layer in range(self.layers):
            self.k[layer][rows, :, at] = torch.from_numpy(present[2 * layer][:, :, L])
            self.v[layer][rows, :, at] = torch.from_numpy(present[2 * layer + 1][:, :, L])
        return torch.from_numpy(logits[:, 0])
