"""Adding an engine is one class and one registry line: a toy engine, registered here and nowhere
else, serves /forward (JSON and streamed) and /v1/completions through the real app, the settings
accept its name, and /metadata names it. Every other engine goes through the same registry."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from lib.inference import (
    ENGINES,
    Engine,
    EngineCapabilities,
    EngineStopped,
    GenerationResult,
)
from ml_service.backend.app import create_app
from ml_service.settings import Settings
from tests.helpers import CHECKPOINT, DEVICE


class ToyEngine(Engine):
    """Answers each prompt with one word per asked token, naming the prompt's length: "toy<N>"
    repeated `max_new_tokens` times. It loads nothing: the server's process holds the tokenizer
    and the model's shape, as for an engine in its own process."""

    capabilities = EngineCapabilities(prompt_logprobs=False, logprobs=False, loads_model=True)

    @classmethod
    def create(cls, spec, *, model=None, observer=None) -> ToyEngine:
        return cls(max_queue=spec.max_queue)

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._up = False

    def start(self) -> None:
        self._up = True

    def stop(self, timeout: float = 30.0) -> None:
        self._up = False

    def abort(self, error: BaseException) -> None:
        self._up = False

    @property
    def stopped(self) -> bool:
        return not self._up

    @property
    def running(self) -> int:
        return 0

    @property
    def waiting(self) -> int:
        return 0

    def _enqueue(self, items, loop, delivers, streamed):
        if not self._up:
            raise EngineStopped("the toy engine is not running")
        for item, deliver in zip(items, delivers, strict=True):
            prompt_tokens = len(item.ids) - 1
            words = [f"toy{prompt_tokens}"] * item.params.max_new_tokens
            if streamed:
                for i, word in enumerate(words):
                    loop.call_soon(deliver, word if i == 0 else f" {word}")
            result = GenerationResult(
                " ".join(words), "length", prompt_tokens, len(words), [0] * len(words)
            )
            loop.call_soon(deliver, result)
        return [_Done() for _ in items]


class _Done:
    def cancel(self) -> None:
        pass


@pytest.fixture(scope="module")
def toy_client():
    ENGINES.register("toy", f"{__name__}:ToyEngine", "a test's engine")
    try:
        settings = Settings(
            checkpoint=CHECKPOINT, device=DEVICE, engine="toy", background_load=False, cache_ttl_s=0
        )
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            yield client
    finally:
        ENGINES.unregister("toy")


def test_registered_names_are_the_settings_choices():
    assert ENGINES.names(generates=True) == ["process", "thread", "vllm"]
    for name in ENGINES.names():
        assert issubclass(ENGINES[name], Engine)
    with pytest.raises(ValueError, match="engine must be one of process, thread, vllm"):
        Settings(engine="toy")  # not registered outside the fixture
    with pytest.raises(ValueError, match="engine must be one of"):
        Settings(engine="micro-batch")  # an engine, but not one that generates text


def test_toy_engine_serves_forward(toy_client):
    r = toy_client.post("/forward", json={"text": "Привет, мир!", "max_new_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert prompt_tokens > 0
    assert body["text"] == " ".join([f"toy{prompt_tokens}"] * 3)
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_toy_engine_streams_forward(toy_client):
    r = toy_client.post("/forward", json={"text": "Привет", "max_new_tokens": 2, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line.removeprefix("data: "))
        for line in r.text.splitlines()
        if line.startswith("data: ")
    ]
    final = events[-1]
    prompt_tokens = final["usage"]["prompt_tokens"]
    assert final["text"] == f"toy{prompt_tokens} toy{prompt_tokens}"
    assert final["finish_reason"] == "length"
    assert "".join(e["text"] for e in events[:-1]) == final["text"]  # the pieces add up


def test_toy_engine_serves_openai_completions(toy_client):
    (model,) = toy_client.get("/v1/models").json()["data"]
    r = toy_client.post(
        "/v1/completions", json={"model": model["id"], "prompt": "Привет", "max_tokens": 4}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert body["choices"][0]["text"] == " ".join([f"toy{prompt_tokens}"] * 4)
    assert body["usage"]["completion_tokens"] == 4


def test_metadata_names_the_toy_engine(toy_client):
    assert toy_client.get("/metadata").json()["engine"] == "toy"


def test_prompt_logprobs_is_unsupported_by_default():
    engine = ToyEngine(max_queue=1)
    with pytest.raises(ValueError, match="does not score prompts"):
        engine.prompt_logprobs([1, 2])
