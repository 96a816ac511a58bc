"""Figures of a language model's fit that every layer reports the same way.

A leaf: it imports nothing of `lib`, so training's evaluation, the serving layer's scores and
the ONNX export's quality check can all use it.
"""

from __future__ import annotations

import math


def bits_per_byte(nll_nats: float, num_bytes: float) -> float:
    """Bits per UTF-8 byte: a summed negative log-likelihood (nats) over the bytes of the text it
    scored. Unlike loss per token, it compares models whose tokenizers differ. No bytes count as
    one, so an empty text gives its NLL in bits rather than a division by zero."""
    return nll_nats / math.log(2) / max(num_bytes, 1.0)
