"""Each default lives in one place and the others follow it: the engine's batching limits
(lib/inference/limits.py's ENGINE_*), the generation parameters (`GenerationParams`), and what reads them
(the service's settings, the checkpoint's generation config, the training card's samples, the
playground, which takes them from /metadata). Importing the service builds nothing heavy."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest

from lib.inference import EngineSpec, GenerationEngine, GenerationParams, InferenceService
from lib.inference.engine_process.client import EngineProcess
from lib.inference.limits import ENGINE_MAX_BATCH_SIZE, ENGINE_MAX_QUEUE, ENGINE_MAX_WAIT_S
from lib.inference.micro_batch import MicroBatcher
from lib.presets import REPO_ROOT
from lib.training.card import default_generation_config, render_model_card, sample_params
from ml_service.backend.schemas import GenerationOptions, parameter_ranges
from ml_service.settings import Settings

STATIC = REPO_ROOT / "ml_service" / "static"


def defaults(func) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(func).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_the_engines_batching_defaults_are_defined_once():
    engine = {
        "max_batch_size": ENGINE_MAX_BATCH_SIZE,
        "max_wait_s": ENGINE_MAX_WAIT_S,
        "max_queue": ENGINE_MAX_QUEUE,
    }
    for func in (GenerationEngine, InferenceService.create_engine, MicroBatcher):
        assert defaults(func).items() >= engine.items(), func
    assert defaults(EngineProcess)["max_queue"] == ENGINE_MAX_QUEUE
    spec = EngineSpec()
    assert (spec.max_batch_size, spec.max_wait_s) == (ENGINE_MAX_BATCH_SIZE, ENGINE_MAX_WAIT_S)
    fields = Settings.model_fields
    assert fields["max_batch_size"].default == ENGINE_MAX_BATCH_SIZE
    assert fields["max_queue"].default == ENGINE_MAX_QUEUE
    assert fields["batch_wait_ms"].default == ENGINE_MAX_WAIT_S * 1000
    assert Settings(batch_wait_ms=250).batch_wait_s == 0.25


def test_generation_defaults_follow_generation_params():
    p = GenerationParams()
    config = default_generation_config(eos_token_id=0)  # written into every checkpoint
    assert (config.temperature, config.top_p, config.top_k) == (p.temperature, p.top_p, p.top_k)
    assert (config.max_new_tokens, config.repetition_penalty) == (
        p.max_new_tokens,
        p.repetition_penalty,
    )
    samples = sample_params()  # a training card's samples: the serving defaults, a fixed seed
    assert (samples.temperature, samples.top_p, samples.top_k) == (p.temperature, p.top_p, p.top_k)
    card = render_model_card({"samples": [{"prompt": "a", "completion": "b"}]})
    assert f"temperature {p.temperature}, top-p {p.top_p}, seed {samples.seed}" in card
    # what /metadata's `sampling` publishes (the playground's defaults)
    published = parameter_ranges(GenerationOptions)
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"):
        assert published[name]["default"] == getattr(p, name), name


def test_the_playground_takes_its_defaults_from_metadata():
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    script = (STATIC / "app.js").read_text(encoding="utf-8")
    listed = re.search(r"const SAMPLING_FIELDS = \[([^\]]*)\]", script)
    assert listed, "app.js names the parameters it fills from /metadata"
    fields = re.findall(r'"(\w+)"', listed.group(1))
    assert set(fields) <= set(parameter_ranges(GenerationOptions))
    for name in fields:
        tag = re.search(rf'<input id="{name}"[^>]*>', page)
        assert tag and "value=" not in tag.group(0), f"{name}: a default written into the page"


@pytest.mark.slow  # the imports in a fresh interpreter
def test_importing_the_service_runs_no_onednn_probe():
    """The probe (a few small oneDNN products) runs when a decoder is first built, not at import."""
    code = (
        "import ml_service.backend.app, ml_service.services.text_generation, solution\n"
        "from lib.inference import decoder\n"
        "print(decoder.onednn_linear.cache_info().currsize,"
        " decoder.onednn_reorder.cache_info().currsize)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "0"]
