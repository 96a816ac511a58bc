"""One request must never fail another: a row whose numbers go wrong, or that makes the model raise,
fails alone, and the rows beside it finish with the text they would have had alone.

Found by an adversarial probe: `repetition_penalty` 1e-39 (then schema-valid) made the sampler's
probabilities NaN, the sampler raised, and every request of that batch got 403."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from lib.inference import GenerationFailed, GenerationParams
from lib.inference.decoder import GPT2SlotDecoder
from lib.inference.sampling import SamplingTensors, sample_next
from ml_service.backend.app import create_app
from ml_service.services.score import ScoreService
from ml_service.services.text_generation import TextGenerationService


# -- the sampler -----------------------------------------------------------------------------------
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("top_k", [20, 0])  # narrow (topk) and wide (sorted) rows
def test_a_non_finite_row_is_flagged_and_the_others_draw_as_alone(poison, temperature, top_k):
    g = torch.Generator().manual_seed(5)
    vocab = 300
    params = [
        GenerationParams(temperature=temperature, top_k=top_k, repetition_penalty=1.0)
        for _ in range(4)
    ]
    logits = torch.randn((4, vocab), generator=g) * 3
    logits[2, 17] = poison
    u = torch.rand(4, generator=g)
    history = torch.zeros((4, 1), dtype=torch.long)
    tokens, bad = sample_next(
        logits.clone(), history, SamplingTensors.build(params, vocab, "cpu"), lambda: u
    )
    assert bad.tolist() == [False, False, True, False]
    for i in (0, 1, 3):
        alone, alone_bad = sample_next(
            logits[i : i + 1].clone(),
            history[:1],
            SamplingTensors.build([params[i]], vocab, "cpu"),
            lambda i=i: u[i : i + 1],
        )
        assert int(tokens[i]) == int(alone[0]) and not alone_bad.any()


def test_a_tiny_penalty_no_longer_reaches_the_sampler_as_nan():
    """The probe's case, below the schema's floor: the sampler itself flags the row (no raise)."""
    vocab = 64
    logits = torch.randn((2, vocab), generator=torch.Generator().manual_seed(1)) * 3
    logits[:, :8] = logits[:, :8].abs() + 1  # seen and positive: divided by 1e-39, they overflow
    params = [GenerationParams(repetition_penalty=1e-39), GenerationParams(temperature=0)]
    history = torch.arange(8).repeat(2, 1)
    tokens, bad = sample_next(
        logits, history, SamplingTensors.build(params, vocab, "cpu"), lambda: torch.rand(2)
    )
    assert bad.tolist() == [True, False]


# -- the engine: a row that makes the model raise ----------------------------------------------------
PROMPTS = ["Привет, мир!", "Москва — столица", "Он открыл дверь и"]
LONG = "Мы долго шли по лесу, пока не вышли к реке, где стоял старый дом. " * 3
ORDINARY = [
    GenerationParams(max_new_tokens=10, temperature=0),
    GenerationParams(max_new_tokens=10, temperature=0.9, seed=7),
    GenerationParams(max_new_tokens=10, temperature=0.7, top_k=0, seed=8),
]


@pytest.fixture
def poisoned(monkeypatch, service) -> dict:
    """The model raises for any batch that holds a row past position `at` (decode) or a prompt
    longer than that (prefill): only the long prompt gets there, the ordinary ones never do."""
    at = {"position": len(service.tokenizer(LONG)["input_ids"]) - 4}
    decode, prefill = GPT2SlotDecoder.decode, GPT2SlotDecoder.prefill

    def bad_decode(self, ids, positions, *args, **kwargs):
        if max(positions) >= at["position"]:
            raise RuntimeError("device-side assert triggered")
        return decode(self, ids, positions, *args, **kwargs)

    def bad_prefill(self, prompts, first_slot, *args, **kwargs):
        if at.get("prefill") and max(len(p) for p in prompts) >= at["position"]:
            raise RuntimeError("device-side assert triggered")
        return prefill(self, prompts, first_slot, *args, **kwargs)

    monkeypatch.setattr(GPT2SlotDecoder, "decode", bad_decode)
    monkeypatch.setattr(GPT2SlotDecoder, "prefill", bad_prefill)
    return at


@pytest.mark.parametrize("where", ["decode", "prefill"])
def test_a_row_that_makes_the_model_raise_fails_alone(service, poisoned, where):
    alone = [service.generate(p, q).text for p, q in zip(PROMPTS, ORDINARY, strict=True)]
    poisoned["prefill"] = where == "prefill"

    async def run():
        engine = service.create_engine(max_batch_size=8)
        engine.start()
        try:
            items = [service.prepare(p, q) for p, q in zip(PROMPTS, ORDINARY, strict=True)]
            items.insert(
                1, service.prepare(LONG, GenerationParams(max_new_tokens=12, ignore_eos=True))
            )
            return await asyncio.gather(*map(engine.submit, items), return_exceptions=True)
        finally:
            engine.stop()

    results = asyncio.run(run())
    assert isinstance(results[1], GenerationFailed), results[1]
    assert [r.text for r in results[:1] + results[2:]] == alone


def test_a_batch_whose_every_row_fails_fails_whole(service, model_failure):
    """When the model fails for every row alone too, every request fails (and nothing hangs)."""

    async def run():
        engine = service.create_engine(max_batch_size=8)
        engine.start()
        try:
            items = [service.prepare(p, q) for p, q in zip(PROMPTS, ORDINARY, strict=True)]
            model_failure["on"] = True
            return await asyncio.gather(*map(engine.submit, items), return_exceptions=True)
        finally:
            engine.stop()

    assert all(isinstance(r, GenerationFailed) for r in asyncio.run(run()))


# -- over HTTP: extreme but schema-valid parameters beside ordinary requests ------------------------
ORDINARY_REQUESTS = [
    {"text": "Привет, мир!", "max_new_tokens": 12, "temperature": 0},
    {"text": "Москва — столица", "max_new_tokens": 12, "seed": 3},
    {"text": "Он открыл дверь и", "max_new_tokens": 12, "seed": 4, "top_k": 0, "top_p": 0.9},
    {"text": "В начале было слово", "max_new_tokens": 12, "temperature": 0},
]
TINY = [5e-324, 1e-300, 1e-39, 1e-30, 1e-6]

extreme_request = st.fixed_dictionaries(
    {"text": st.sampled_from(["Москва", "а", "!!!", "Привет " * 30, "\u200b😀\t\n", "ёЁ"])},
    optional={
        "temperature": st.sampled_from([0.0, *TINY, 1e-5, 4.99, 5.0])
        | st.floats(0, 5, allow_nan=False),
        "top_p": st.sampled_from([*TINY, 1.0]) | st.floats(1e-300, 1.0),
        "top_k": st.sampled_from([0, 1, 8191, 8192, 8193, 2**63 - 1, 10**30]),
        "repetition_penalty": st.sampled_from([0.01, 0.0100001, 9.99, 10.0])
        | st.floats(0.01, 10.0),
        "seed": st.sampled_from([0, 1, 2**63 - 1]) | st.integers(0, 2**63 - 1),
        "stop": st.lists(
            st.sampled_from(["\n", "а", " ", ".", "�", "x" * 64, "😀"]), min_size=1, max_size=8
        ),
        "min_new_tokens": st.integers(0, 4),
        "max_new_tokens": st.integers(4, 8),
    },
)


@pytest.fixture(scope="module")
def textgen_app(service, settings):
    app = create_app(settings, service=TextGenerationService(settings, inference=service))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def send_together(client, path: str, bodies: list[dict]) -> list:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: client.post(path, json=b), bodies))


@hsettings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(extremes=st.lists(extreme_request, min_size=1, max_size=6))
def test_extreme_parameters_never_fail_ordinary_requests(textgen_app, extremes):
    alone = getattr(test_extreme_parameters_never_fail_ordinary_requests, "alone", None)
    if alone is None:
        alone = [textgen_app.post("/forward", json=b).json()["text"] for b in ORDINARY_REQUESTS]
        test_extreme_parameters_never_fail_ordinary_requests.alone = alone
    answers = send_together(textgen_app, "/forward", ORDINARY_REQUESTS + extremes)
    ordinary, extreme = answers[: len(ORDINARY_REQUESTS)], answers[len(ORDINARY_REQUESTS) :]
    assert [r.status_code for r in ordinary] == [200] * len(ORDINARY_REQUESTS)
    assert [r.json()["text"] for r in ordinary] == alone
    for body, r in zip(extremes, extreme, strict=True):
        # the extreme ones are valid: they are answered too, never with a 5xx
        assert r.status_code in (200, 400), (body, r.status_code, r.text)
        if r.status_code == 400:  # only a min_new_tokens above max_new_tokens is refused
            assert body.get("min_new_tokens", 0) > body.get("max_new_tokens", 64), r.text


def test_the_probes_request_is_now_a_400(textgen_app):
    r = textgen_app.post("/forward", json={"text": "Москва", "repetition_penalty": 1e-39})
    assert r.status_code == 400
    assert r.json()["errors"][0]["loc"] == ["repetition_penalty"]


@pytest.fixture(scope="module")
def score_app(service, settings):
    app = create_app(settings, service=ScoreService(settings, inference=service))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@hsettings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    texts=st.lists(
        st.text(min_size=1, max_size=300).filter(str.strip)
        | st.sampled_from(["😀" * 80, "\x00\x01", "а" * 600, "слово, " * 280]),
        min_size=1,
        max_size=6,
    )
)
def test_odd_texts_never_fail_ordinary_scores(score_app, texts):
    ordinary = [{"text": "Он открыл дверь и вошёл."}, {"text": "Москва — столица России."}]
    alone = [score_app.post("/forward", json=b).json()["log_likelihood"] for b in ordinary]
    answers = send_together(score_app, "/forward", ordinary + [{"text": t} for t in texts])
    assert [r.status_code for r in answers[:2]] == [200, 200]
    assert [r.json()["log_likelihood"] for r in answers[:2]] == pytest.approx(alone, abs=1e-3)
    for r in answers[2:]:
        assert r.status_code in (200, 400), r.text
