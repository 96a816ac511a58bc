"""Bits per byte: one formula, used by training's evaluation, the scores served and the ONNX
export's quality check."""

from __future__ import annotations

import math

import pytest

from lib.metrics import bits_per_byte


def test_bits_per_byte_formula():
    assert bits_per_byte(math.log(2) * 100, 100) == pytest.approx(1.0)


def test_a_served_score_uses_the_same_formula():
    from lib.inference.scoring import TextScore

    score = TextScore(tokens=["a", "b"], logprobs=[-1.5, -2.0], num_bytes=7)
    assert score.bits_per_byte == bits_per_byte(3.5, 7)
    assert TextScore(tokens=[], logprobs=[-1.0], num_bytes=0).bits_per_byte == 1 / math.log(2)
