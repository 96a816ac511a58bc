"""The service contract: discovery by entry point, running by name, the shared error mapping,
the score service's numbers, and the example third-party plugin."""

from __future__ import annotations

import math
import subprocess
import sys

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lib.presets import REPO_ROOT
from ml_service.backend.app import create_app
from ml_service.backend.errors import MODEL_FAILED
from ml_service.contract import (
    InvalidInput,
    ModelService,
    UnknownService,
    discover_services,
    load_service_class,
)
from ml_service.services.score import ScoreService
from tests.helpers import CHECKPOINT, running_server

RUNNER = [sys.executable, "-m", "ml_service.runner"]


def test_builtin_and_installed_plugins_are_discovered():
    found = discover_services()
    assert {"text-generation", "score", "text-stats"} <= set(found)
    assert load_service_class("score") is ScoreService
    assert load_service_class("text-stats").__module__ == "text_stats_service"


@pytest.mark.slow  # the runner in a fresh interpreter
def test_unknown_service_lists_the_known_ones():
    with pytest.raises(UnknownService, match="text-generation"):
        load_service_class("no-such-service")
    r = subprocess.run([*RUNNER, "no-such-service"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert r.returncode == 2
    assert "unknown service 'no-such-service'" in r.stderr
    assert all(name in r.stderr for name in ("text-generation", "score", "text-stats"))


@pytest.mark.slow  # the runner in two fresh interpreters
def test_runner_list_and_help_name_every_service():
    listing = subprocess.run([*RUNNER, "list"], capture_output=True, text=True, cwd=REPO_ROOT)
    helptext = subprocess.run([*RUNNER, "--help"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert listing.returncode == 0 and helptext.returncode == 0
    for name in ("text-generation", "score", "text-stats"):
        assert name in listing.stdout and name in helptext.stdout
    assert "per-token log-probabilities" in listing.stdout


class EchoRequest(BaseModel):
    text: str


class EchoResponse(BaseModel):
    model: str
    text: str


class FlakyService(ModelService):
    """Rejects 'bad' in preprocess, fails in predict on 'boom'."""

    name = "flaky"
    description = "test service"
    request_model = EchoRequest
    response_model = EchoResponse

    def preprocess(self, request):
        if request.text == "bad":
            raise InvalidInput("bad is not allowed")
        return request.text

    def predict(self, batch):
        if "boom" in batch:
            raise RuntimeError("internal detail")
        return [t.upper() for t in batch]

    def postprocess(self, output, request):
        return EchoResponse(model=self.model_id, text=output)


def test_one_error_mapping_for_every_service(settings):
    with TestClient(
        create_app(settings, service=FlakyService(settings)), raise_server_exceptions=False
    ) as c:
        assert c.post("/forward", json={"text": "ok"}).json() == {"model": "flaky", "text": "OK"}
        bad = c.post("/forward", json={"text": "bad"})
        assert bad.status_code == 400 and bad.json()["errors"][0]["msg"] == "bad is not allowed"
        assert c.post("/forward", json={"txt": "x"}).status_code == 400  # schema error
        boom = c.post("/forward", json={"text": "boom"})
        assert boom.status_code == 403 and boom.json() == {"detail": MODEL_FAILED}
        assert "internal detail" not in boom.text
        batch = c.post("/forward_batch", json={"items": [{"text": "a"}, {"text": "b"}]})
        assert batch.json() == {
            "model": "flaky",
            "results": [{"model": "flaky", "text": "A"}, {"model": "flaky", "text": "B"}],
        }
        assert (
            c.post("/forward_batch", json={"items": [{"text": "a"}, {"text": "bad"}]}).status_code
            == 400
        )
        assert c.get("/metadata").json()["service"] == "flaky"


@pytest.fixture(scope="module")
def score_client(service, settings):
    with TestClient(create_app(settings, service=ScoreService(settings, inference=service))) as c:
        yield c


def test_score_matches_direct_transformers_computation(score_client):
    text = "Москва — столица России."
    r = score_client.post("/forward", json={"text": text})
    assert r.status_code == 200, r.text
    body = r.json()

    tok = AutoTokenizer.from_pretrained(str(CHECKPOINT))
    model = AutoModelForCausalLM.from_pretrained(str(CHECKPOINT)).eval()
    ids = tok(tok.eos_token + text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
    expected = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)

    assert body["num_tokens"] == len(expected) == len(body["tokens"])
    assert [t["logprob"] for t in body["tokens"]] == pytest.approx(expected.tolist(), abs=1e-4)
    assert "".join(t["token"] for t in body["tokens"]) == text
    total = expected.sum().item()
    assert body["log_likelihood"] == pytest.approx(total, abs=1e-3)
    assert body["perplexity"] == pytest.approx(math.exp(-total / len(expected)), rel=1e-4)
    assert body["num_bytes"] == len(text.encode())
    assert body["bits_per_byte"] == pytest.approx(
        -total / math.log(2) / len(text.encode()), rel=1e-4
    )


def test_score_batch_equals_single_and_russian_beats_noise(score_client):
    texts = ["Он открыл дверь и вошёл в комнату.", "zqxj vvkw pplt qqrz"]
    batch = score_client.post(
        "/forward_batch", json={"items": [{"text": t} for t in texts]}
    ).json()["results"]
    single = score_client.post("/forward", json={"text": texts[0]}).json()
    assert batch[0]["log_likelihood"] == pytest.approx(single["log_likelihood"], abs=1e-3)
    assert batch[0]["bits_per_byte"] < batch[1]["bits_per_byte"]


def test_score_rejects_bad_input(score_client):
    assert score_client.post("/forward", json={"text": ""}).status_code == 400
    r = score_client.post("/forward", json={"text": "слово, " * 280})  # within the char limit
    assert r.status_code == 400 and "context" in r.json()["errors"][0]["msg"]


@pytest.mark.slow
def test_plugin_runs_by_name_over_http():
    with running_server(["text-stats"], runner=True) as proc:
        url = proc.url
        r = httpx.post(f"{url}/forward", json={"text": "Привет, мир! Мир большой."}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["words"] == 4 and body["sentences"] == 2 and body["cyrillic_share"] == 1.0
        assert body["most_common_words"][0] == ["мир", 2]
        form = httpx.post(f"{url}/forward", files={"file": ("t.txt", "Ёж.".encode())}, timeout=30)
        assert form.json()["words"] == 1
        assert httpx.post(f"{url}/forward", json={"text": " "}, timeout=30).status_code == 400
        assert httpx.get(f"{url}/metadata", timeout=30).json()["service"] == "text-stats"


@pytest.mark.slow
def test_score_service_runs_by_name_over_http():
    with running_server(["score", "--checkpoint", str(CHECKPOINT)], runner=True) as proc:
        url = proc.url
        r = httpx.post(f"{url}/forward", data={"text": "Привет, мир!"}, timeout=60)
        assert r.status_code == 200 and r.json()["num_tokens"] > 0
