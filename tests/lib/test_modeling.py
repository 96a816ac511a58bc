"""The model presets (`lib.presets.PRESETS`, built by `lib.modeling`): GPT-2's published sizes."""

from __future__ import annotations

import pytest
import torch

from lib.modeling import build_model, count_parameters
from lib.presets import PRESETS

# GPT-2 sizes as published by OpenAI / Hugging Face (tied embeddings counted once)
EXPECTED_PARAMETERS = {
    "tiny": 3_401_856,
    "gpt2-124m": 124_439_808,
    "gpt2-350m": 354_823_168,
    "gpt2-774m": 774_030_080,
    "gpt2-1.5b": 1_557_611_200,
    "gpt2-1b": 1_019_221_504,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count(name):
    preset = PRESETS[name]
    with torch.device("meta"):  # no memory for the big ones
        model = build_model(preset)
    assert count_parameters(model) == EXPECTED_PARAMETERS[name] == preset.approx_parameters()
    assert preset.n_embd % preset.n_head == 0


def test_gpt2_1b_vocabulary_is_padded():
    assert (
        PRESETS["gpt2-1b"].vocab_size % 128 == 0
        and 50_000 <= PRESETS["gpt2-1b"].vocab_size <= 64_000
    )
