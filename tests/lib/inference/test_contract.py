"""The engine contract's promises that no engine test shows: the types, the contract and the
registry (and the service's settings and schemas above them) load without torch, and every
registered engine is a complete `Engine`."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from lib.inference import ENGINES, Engine


@pytest.mark.slow  # a fresh interpreter
def test_the_public_types_settings_and_schemas_import_no_torch():
    probe = (
        "import sys\n"
        "import lib.inference, lib.inference.types, ml_service.settings, ml_service.backend.schemas\n"
        "from lib.inference import ENGINES, GenerationParams, EngineSpec\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy) or 'none')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "none"


def test_every_registered_engine_implements_the_whole_contract():
    for name in ENGINES.names():
        cls = ENGINES[name]
        assert issubclass(cls, Engine), name
        assert not inspect.isabstract(cls), (name, sorted(cls.__abstractmethods__))
        assert cls.family, name  # the response cache keys on it
    # engines of our own decoding code share a family; vLLM's samples differently
    assert ENGINES["thread"].family == ENGINES["process"].family != ENGINES["vllm"].family
