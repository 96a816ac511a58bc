"""Shared fixtures: the real committed default model, loaded once, and apps built around it
(plain helpers are in tests/helpers.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lib.inference import InferenceService
from lib.inference.decoder import GPT2SlotDecoder
from ml_service.backend.app import create_app
from ml_service.services.text_generation import TextGenerationService
from ml_service.settings import Settings
from tests.helpers import CHECKPOINT, DEVICE, free_port
from tests.redis_server import RedisServer

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def service() -> InferenceService:
    return InferenceService.from_checkpoint(CHECKPOINT, device=DEVICE)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(
        checkpoint=CHECKPOINT,
        device=DEVICE,
        max_texts=8,
        max_file_bytes=4096,
        max_text_chars=2000,
        background_load=False,
        # every request reaches the model (tests/ml_service/test_cache.py turns the cache on)
        cache_ttl_s=0,
        # apps built from these settings load versions in this process, where tests can reach
        # the decoder (monkeypatched failures, gates); tests/lib/inference/test_engine_process.py
        # and the subprocess servers (tests/system/test_server.py) run the default, the engine's
        # own process
        engine="thread",
    )


@pytest.fixture(scope="session")
def textgen(service, settings) -> TextGenerationService:
    return TextGenerationService(settings, inference=service)


@pytest.fixture(scope="session")
def client(textgen, settings):
    with TestClient(create_app(settings, service=textgen), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def models_dir(tmp_path) -> Path:
    """v1 and v2 (the same weights, told apart by model id), and v3, a broken checkpoint."""
    for name in ("v1", "v2"):
        shutil.copytree(CHECKPOINT, tmp_path / name)
        card_path = tmp_path / name / "training_card.json"
        card = json.loads(card_path.read_text())
        card_path.write_text(json.dumps({**card, "model_id": f"ru-gpt-tiny-{name}"}))
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "config.json").write_text("{not json")
    return tmp_path


@pytest.fixture
def model_failure(monkeypatch) -> dict:
    """While `switch["on"]`, every forward pass of the model raises inside generation, as a broken
    checkpoint, an out-of-memory or a failing GPU would. Off at first (so an app's warm-up passes)."""
    switch = {"on": False}
    for name in ("prefill", "decode"):
        original = getattr(GPT2SlotDecoder, name)

        def broken(self, *args, _original=original, **kwargs):
            if switch["on"]:
                raise RuntimeError("CUDA error: device-side assert triggered")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(GPT2SlotDecoder, name, broken)
    return switch


@pytest.fixture
def redis_server():
    """A real redis-server on a free port (tests/redis_server.py), stopped after the test."""
    server = RedisServer(free_port()).start()
    try:
        yield server
    finally:
        server.stop()
