"""LoRA adapters served over one base model, many in the same batch.

An adapter is a PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`, what
`train_distributed.py --lora-rank` writes): for some of GPT-2's Conv1D products (`c_attn`,
`attn.c_proj`, `c_fc`, `mlp.c_proj`), two small matrices A (rank x in) and B (out x rank), and
the product's output gains `scaling * (x @ A.T) @ B.T` (PEFT's LoRA with `fan_in_fan_out`).

`AdapterBank` holds the loaded adapters of one decoder. For each product of each layer it keeps
every loaded adapter's A side by side, `(in, K)`, and its B (scaling folded in) stacked, `(K, out)`,
where K is the sum of their ranks. A step whose rows use adapters then pays, per product, two thin
products for the whole batch, whatever the mix: `((x @ A_all) * mask) @ B_all`, where a row's
mask keeps its own adapter's columns and zeroes the rest (a base-model row's mask is all zero, so
its numbers are the base model's, computed as they are while adapters are loaded: the MLP's GELU
after its first product rather than fused into it, since an update goes between the two). That is
the Punica / S-LoRA idea (one base product for
every row, plus a low-rank update gathered per row) with the gather done by a mask, which costs
K columns (a few dozen) instead of a copy of each row's matrices. A step with no adapter rows
skips it all.

Loading checks that the adapter fits the served model: a LoRA of PEFT's plain kind, targets that
are products of this model with the right shapes, finite numbers, and, where the adapter's
training card names its base's checkpoint hash, the same hash as the served checkpoint's
(`AdapterError` otherwise, with the reason). Loaded adapters are bounded by a memory budget; the
least recently used one not in use is unloaded to make room.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from lib.inference.adapter_names import CONFIG, name_problem

WEIGHTS = "adapter_model.safetensors"
CARD = "training_card.json"
# PEFT's key for a LoRA matrix of GPT-2: base_model.model.transformer.h.<i>.<attn|mlp>.<name>.lora_<A|B>.weight
_KEY = re.compile(
    r"^base_model\.model\.transformer\.h\.(\d+)\.(attn|mlp)\.(c_attn|c_proj|c_fc)\.lora_([AB])\.weight$"
)
# the decoder's name for each product (decoder._Block)
PRODUCTS = {
    ("attn", "c_attn"): "attn",
    ("attn", "c_proj"): "proj",
    ("mlp", "c_fc"): "mlp_in",
    ("mlp", "c_proj"): "mlp_out",
}


class AdapterError(ValueError):
    """An adapter that cannot be served on this model (the message says why)."""


class AdapterNotFound(LookupError):
    """A request named an adapter that is not loaded (or is being removed)."""

    def __init__(self, name: str):
        super().__init__(name)  # (its only argument: it pickles across the engine's pipe)
        self.name = name

    def __str__(self) -> str:
        return f"adapter {self.name!r} is not loaded"


@dataclass(frozen=True)
class Adapter:
    """One loaded LoRA adapter: per (layer, product), A.T (in, rank) and scaling * B.T (rank, out)."""

    name: str
    path: str
    rank: int
    sha256: str  # of its weights file: part of the prefix cache's block names
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    base_sha256: str | None  # the base checkpoint its card names, if any

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())

    def describe(self) -> dict:
        return {"name": self.name, "rank": self.rank, "sha256": self.sha256, "bytes": self.nbytes}


def check_name(name: str) -> str:
    if (problem := name_problem(name)) is not None:
        raise AdapterError(problem)
    return name


def _shapes(model) -> dict[tuple[int, str], tuple[int, int]]:
    """(layer, product) -> (in, out) of the model's Conv1Ds (or their int8 replacements)."""
    out = {}
    for i, block in enumerate(model.transformer.h):
        for (part, module), product in PRODUCTS.items():
            m = getattr(getattr(block, part), module)
            w = m.weight
            shape = (
                (w.shape[0], w.shape[1])
                if type(m).__name__ == "Conv1D"
                else (m.in_features, m.out_features)
            )
            out[(i, product)] = shape
    return out


def load_adapter(
    name: str, path: str | Path, model, base_sha256: str | None, dtype: torch.dtype, device
) -> Adapter:
    """Read and check a PEFT LoRA directory against `model` (module docstring)."""
    from safetensors import SafetensorError, safe_open

    check_name(name)
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise AdapterError(f"adapter {name!r}: {path} has no {CONFIG} and {WEIGHTS}")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: {CONFIG} is not JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {config.get('peft_type')!r}, not LORA")
    for flag in ("use_dora", "use_qalora", "use_bdlora"):
        if config.get(flag):
            raise AdapterError(f"adapter {name!r}: {flag} is not served (plain LoRA only)")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise AdapterError(f"adapter {name!r}: trained biases or whole modules are not served")
    rank, alpha = int(config.get("r") or 0), float(config.get("lora_alpha") or 0)
    if rank <= 0:
        raise AdapterError(f"adapter {name!r}: rank r={rank}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"adapter {name!r}: per-module ranks or alphas are not served")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    card_base = None
    if (path / CARD).is_file():
        try:
            card_base = (json.loads((path / CARD).read_text()).get("base") or {}).get("sha256")
        except (OSError, ValueError):
            card_base = None
    if card_base and base_sha256 and card_base != base_sha256:
        raise AdapterError(
            f"adapter {name!r} was trained on the checkpoint with sha256 {card_base[:12]}..., "
            f"not the served one ({base_sha256[:12]}...)"
        )
    shapes = _shapes(model)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(path / WEIGHTS, "pt") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m is None:
                    raise AdapterError(f"adapter {name!r}: {key!r} is not a LoRA matrix of GPT-2")
                layer, part, module, ab = int(m[1]), m[2], m[3], m[4]
                if (layer, PRODUCTS[(part, module)]) not in shapes:
                    raise AdapterError(f"adapter {name!r}: {key!r}: the model has no layer {layer}")
                parts.setdefault((layer, PRODUCTS[(part, module)]), {})[ab] = f.get_tensor(key)
    except SafetensorError as e:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS} is not readable: {e}") from None
    if not parts:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS} holds no LoRA matrices")
    weights = {}
    for key, ab in parts.items():
        fan_in, fan_out = shapes[key]
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            raise AdapterError(f"adapter {name!r}: layer {key[0]} {key[1]} lacks lora_A or lora_B")
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise AdapterError(
                f"adapter {name!r}: layer {key[0]} {key[1]}: shapes {tuple(a.shape)} and "
                f"{tuple(b.shape)} do not fit this model's ({rank}, {fan_in}) and ({fan_out}, {rank})"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"adapter {name!r}: layer {key[0]} {key[1]} has non-finite numbers")
        weights[key] = (
            a.t().to(device=device, dtype=dtype).contiguous(),
            (b.t().float() * scaling).to(device=device, dtype=dtype).contiguous(),
        )
    digest = hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
    return Adapter(name, str(path), rank, digest, weights, card_base)


class AdapterBank:
    """The adapters one decoder serves (module docstring). Not thread-safe: the engine's decoding
    thread owns it (the engine passes additions and removals to it)."""

    def __init__(self, model, budget_bytes: int, base_sha256: str | None = None):
        self.model = model
        self.budget = budget_bytes
        self.base_sha256 = base_sha256
        # the model's float dtype (its products may be int8); a model of another runtime (ONNX
        # Runtime) has no torch weights, and no adapters (its budget is 0)
        wte = getattr(getattr(model, "transformer", None), "wte", None)
        self.dtype = torch.float32 if wte is None else wte.weight.dtype
        self.device = torch.device("cpu") if wte is None else wte.weight.device
        self.adapters: OrderedDict[str, Adapter] = OrderedDict()  # least recently used first
        self.in_use: dict[str, int] = {}  # rows running with each adapter
        self.retiring: set[str] = set()  # removed, unloaded once their last row ends
        self._stacked: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._columns: dict[str, slice] = {}
        self.width = 0  # K: the stacked ranks

    # -- loading ----------------------------------------------------------------------------
    def add(self, name: str, path: str | Path) -> Adapter:
        if self.budget <= 0:
            raise AdapterError("this engine serves no adapters (ML_SERVICE_MAX_ADAPTER_MB is 0)")
        adapter = load_adapter(name, path, self.model, self.base_sha256, self.dtype, self.device)
        if adapter.nbytes > self.budget:
            raise AdapterError(
                f"adapter {name!r} takes {adapter.nbytes / 2**20:.1f} MiB, more than the adapter "
                f"budget ({self.budget / 2**20:.1f} MiB, ML_SERVICE_MAX_ADAPTER_MB)"
            )
        if name in self.adapters:
            if self.in_use.get(name):
                raise AdapterError(
                    f"adapter {name!r} is serving requests: remove it, then add it again once "
                    "they end"
                )
            del self.adapters[name]
        while sum(a.nbytes for a in self.adapters.values()) + adapter.nbytes > self.budget:
            idle = next((n for n in self.adapters if not self.in_use.get(n)), None)
            if idle is None:
                raise AdapterError(
                    f"no room for adapter {name!r}: every loaded adapter is in use (budget "
                    f"{self.budget / 2**20:.1f} MiB)"
                )
            del self.adapters[idle]
        self.adapters[name] = adapter
        self._restack()
        return adapter

    def remove(self, name: str) -> None:
        """Unload `name` now, or, while rows use it, once the last of them ends (new requests
        for it are refused from now on)."""
        if name not in self.adapters or name in self.retiring:
            raise AdapterNotFound(name)
        if self.in_use.get(name):
            self.retiring.add(name)
            return
        del self.adapters[name]
        self._restack()

    def get(self, name: str) -> Adapter:
        adapter = self.adapters.get(name)
        if adapter is None or name in self.retiring:
            raise AdapterNotFound(name)
        self.adapters.move_to_end(name)
        return adapter

    def acquire(self, name: str) -> Adapter:
        """A row starts with `name` (AdapterNotFound: not loaded, or being removed)."""
        adapter = self.get(name)
        self.in_use[name] = self.in_use.get(name, 0) + 1
        return adapter

    def release(self, name: str) -> None:
        """A row that used `name` ended; a removal waiting for it happens now."""
        left = self.in_use.get(name, 0) - 1
        if left > 0:
            self.in_use[name] = left
            return
        self.in_use.pop(name, None)
        if name in self.retiring:
            self.retiring.discard(name)
            del self.adapters[name]
            self._restack()

    def describe(self) -> list[dict]:
        return [
            {**a.describe(), "running": self.in_use.get(n, 0), "removing": n in self.retiring}
            for n, a in self.adapters.items()
        ]

    def _restack(self) -> None:
        """The side-by-side A and stacked B of every product, over the loaded adapters."""
        self._columns, start = {}, 0
        for name, a in self.adapters.items():
            self._columns[name] = slice(start, start + a.rank)
            start += a.rank
        self.width = start
        self._stacked = {}
        keys = {key for a in self.adapters.values() for key in a.weights}
        shapes = _shapes(self.model)
        for key in keys:
            fan_in, fan_out = shapes[key]
            A = torch.zeros((fan_in, self.width), dtype=self.dtype, device=self.device)
            B = torch.zeros((self.width, fan_out), dtype=self.dtype, device=self.device)
            for name, a in self.adapters.items():
                if key in a.weights:
                    cols = self._columns[name]
                    A[:, cols], B[cols] = a.weights[key]
            self._stacked[key] = (A, B)

    # -- a step -----------------------------------------------------------------------------
    def rows(self, names: list[str | None]) -> RowAdapters | None:
        """The update for rows using `names` (None: the base model); None when no row uses an
        adapter."""
        if not any(names):
            return None
        mask = torch.zeros((len(names), self.width), dtype=self.dtype, device=self.device)
        for i, name in enumerate(names):
            if name:
                mask[i, self._columns[name]] = 1
        return RowAdapters(self._stacked, mask)


@dataclass
class RowAdapters:
    """One step's LoRA update: `add(layer, product, x, y)` for x (N, in), N the step's rows."""

    stacked: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor  # (N, K)

    def repeated(self, times: int) -> RowAdapters:
        """For a prefill: each row's mask for each of its `times` tokens (row-major)."""
        return RowAdapters(self.stacked, self.mask.repeat_interleave(times, dim=0))

    def add(self, layer: int, product: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the product's output for x, a tensor of its own) plus the update, in place (three
        small ops per product: a step makes many of them)."""
        ab = self.stacked.get((layer, product))
        if ab is None:
            return y
        A, B = ab
        return y.addmm_(torch.mm(x, A).mul_(self.mask), B)
