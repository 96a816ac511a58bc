"""int8 serving on CPUs (`ML_SERVICE_QUANTIZATION=int8`, lib/inference/quantization.py): the
product, the model it quantizes, the decoder over it, its quality against fp32, and the service
serving it on every route (seeded answers reproducible, 16 at once equal to each alone, the
precision in /metadata and in the response cache's key), with clear errors where it cannot run."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from lib.inference import GenerationParams, InferenceService
from lib.inference.decoder import GPT2SlotDecoder
from lib.inference.prompts import encode_prompts
from lib.inference.quantization import (
    Int8Linear,
    check_quantization,
    int8_available,
    quantization_of,
    quantize,
    served_parameters,
)
from lib.modeling import count_parameters
from ml_service.backend.app import create_app
from ml_service.services.text_generation import TextGenerationService
from ml_service.settings import Settings
from tests.helpers import CHECKPOINT, DEVICE, is_russian, read_sse, with_settings

pytestmark = pytest.mark.skipif(
    DEVICE != "cpu" or int8_available() is not None, reason="int8 serves on CPUs with _int_mm"
)

PROMPTS = ["Привет, мир!", "Москва — столица", "Однажды утром", "В лесу родилась ёлочка"]
TEXTS = [
    "Солнце светило ярко, и дети играли во дворе до самого вечера.",
    "Он открыл книгу и начал читать вслух, медленно произнося каждое слово.",
    "Зимой в деревне тихо: снег лежит на крышах, и дым поднимается из труб.",
]


@pytest.fixture(scope="module")
def int8() -> InferenceService:
    return InferenceService.from_checkpoint(CHECKPOINT, quantization="int8")


@pytest.fixture(scope="module")
def int8_client(settings):
    s = with_settings(settings, quantization="int8")
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        yield c


# -- the product ----------------------------------------------------------------------------------
def test_an_int8_product_is_close_and_a_rows_result_does_not_depend_on_its_neighbours():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g) * 0.05, torch.randn(96, generator=g)
    x = torch.randn(16, 64, generator=g)
    x[5] *= 100  # a row with large values beside small ones: per-row scales keep the rest exact
    q = Int8Linear(w, b)
    got, want = q(x), torch.nn.functional.linear(x, w, b)
    for row in (0, 3, 15):
        rel = (got[row] - want[row]).norm() / want[row].norm()
        assert rel < 0.02, (row, rel)
        assert torch.equal(q(x[row : row + 1])[0], got[row])  # alone == in the batch, bit for bit
    assert q(x.view(4, 4, 64)).shape == (4, 4, 96)  # any leading shape, as nn.Linear


def test_quantize_replaces_the_block_products_and_keeps_the_embedding(int8):
    model = int8.model
    for block in model.transformer.h:
        for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert isinstance(m, Int8Linear) and m.qweight.dtype == torch.int8
    assert not isinstance(model.lm_head, Int8Linear)  # tied to the fp32 embedding
    assert model.lm_head.weight is model.transformer.wte.weight
    assert quantization_of(model) == "int8"
    assert int8.runtime() == {
        "backend": "torch",
        "precision": "int8",
        "model_file": "model.safetensors",
    }


def test_the_decoder_runs_the_int8_modules_as_the_model_forward_does(int8):
    model, tok = int8.model, int8.tokenizer
    prompts = encode_prompts(tok, PROMPTS[:3])
    dec = GPT2SlotDecoder(model)
    with torch.inference_mode():
        logits = dec.prefill(prompts, 0)
        for ids, row in zip(prompts, logits, strict=True):
            ref = model(torch.tensor([ids])).logits[0, -1]
            # the same int8 products; attention and norms may round an input differently by one
            # quantum, so the logits agree closely rather than bit for bit
            assert torch.allclose(row, ref, atol=0.05), (row - ref).abs().max()
            assert row.argmax() == ref.argmax()


def test_int8_costs_little_quality_against_fp32(int8, service):
    """bits/byte of a few held-out sentences: int8 within 2 % of fp32 (BENCHMARKS.md has the
    validation and held-out sets)."""

    def bits_per_byte(s):
        scores = s.score(TEXTS)
        nll = -sum(sum(x.logprobs) for x in scores)
        return nll / math.log(2) / sum(x.num_bytes for x in scores)

    fp32, q = bits_per_byte(service), bits_per_byte(int8)
    assert abs(q - fp32) / fp32 < 0.02, (fp32, q)


def test_int8_greedy_text_is_russian_and_seeded_samples_repeat(int8):
    greedy = GenerationParams(max_new_tokens=16, temperature=0)
    out = int8.generate(PROMPTS[0], greedy)
    assert is_russian(out.text)
    seeded = GenerationParams(max_new_tokens=16, temperature=0.9, seed=7)
    assert int8.generate(PROMPTS[1], seeded).text == int8.generate(PROMPTS[1], seeded).text


# -- serving it -------------------------------------------------------------------------------
def test_metadata_reports_int8(int8_client):
    m = int8_client.get("/metadata").json()
    assert (m["backend"], m["precision"]) == ("torch", "int8")


def test_int8_serves_every_route(int8_client):
    body = {"text": PROMPTS[0], "max_new_tokens": 8, "temperature": 0}
    r = int8_client.post("/forward", json=body)
    assert r.status_code == 200 and r.json()["text"], r.text
    r = int8_client.post("/forward_batch", json={"texts": PROMPTS[:2], "max_new_tokens": 8})
    assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
    r = int8_client.post("/forward", files={"file": ("p.txt", PROMPTS[1].encode())})
    assert r.status_code == 200, r.text
    with int8_client.stream("POST", "/forward", json={**body, "stream": True}) as s:
        events = read_sse(s.read().decode())
    assert events and events[-1][0] == "done", events[-3:]
    model = int8_client.get("/v1/models").json()["data"][0]["id"]
    r = int8_client.post(
        "/v1/completions", json={"model": model, "prompt": PROMPTS[2], "max_tokens": 8}
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
    chat = {"model": model, "messages": [{"role": "user", "content": PROMPTS[3]}]}
    r = int8_client.post("/v1/chat/completions", json={**chat, "max_tokens": 8, "min_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text


def test_sixteen_at_once_equal_each_alone_and_seeds_repeat(int8_client):
    bodies = [
        {
            "text": PROMPTS[i % len(PROMPTS)],
            "max_new_tokens": 12,
            "temperature": 0 if i % 2 else 0.9,
            "seed": i,
        }
        for i in range(16)
    ]

    def ask(body):
        r = int8_client.post("/forward", json=body)
        assert r.status_code == 200, r.text
        return r.json()["text"]

    alone = [ask(b) for b in bodies]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, bodies))
    assert together == alone
    assert ask(bodies[0]) == alone[0]  # a seeded sample repeats


def test_the_cache_key_names_the_precision(settings, service, int8):
    fp32 = TextGenerationService(settings, inference=service)
    q = TextGenerationService(with_settings(settings, quantization="int8"), inference=int8)
    params = GenerationParams(max_new_tokens=4, temperature=0)
    a, b = (
        fp32.cache_key(service.prepare(PROMPTS[0], params)),
        q.cache_key(int8.prepare(PROMPTS[0], params)),
    )
    assert a and b and a != b


# -- where it cannot run ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"device": "cuda"}, "serves on CPUs"),
        ({"dtype": "bfloat16"}, "float32 activations"),
        ({"engine": "vllm"}, "runs under our engine"),
    ],
)
def test_settings_refuse_int8_where_it_cannot_run(changes, words):
    with pytest.raises(ValueError, match=words):
        Settings(quantization="int8", **changes)


def test_the_former_onnx_precision_variable_still_sets_it(monkeypatch):
    monkeypatch.setenv("ML_SERVICE_ONNX_PRECISION", "fp32")
    assert Settings().quantization == "none"
    monkeypatch.setenv("ML_SERVICE_ONNX_PRECISION", "int8")
    assert Settings().quantization == "int8"
    monkeypatch.setenv("ML_SERVICE_QUANTIZATION", "none")  # the new name wins
    assert Settings().quantization == "none"


def test_an_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantization must be one of none, int8"):
        check_quantization("int4", "cpu", "float32")
    model = InferenceService.from_checkpoint(CHECKPOINT).model
    assert quantize(model, "none") is model and quantization_of(model) == "none"


@pytest.mark.slow
def test_the_engine_process_serves_int8_like_the_thread_engine(settings, int8_client):
    """The default engine loads the weights in its own process from the same spec: the server's
    process reports int8 without holding them, and the greedy text is the thread engine's."""
    body = {"text": PROMPTS[2], "max_new_tokens": 12, "temperature": 0}
    s = with_settings(settings, quantization="int8", engine="process")
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        assert c.get("/metadata").json()["precision"] == "int8"
        r = c.post("/forward", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == int8_client.post("/forward", json=body).json()["text"]


def test_an_int8_model_is_sized_by_its_matrices_too(int8, service):
    """The int8 matrices are buffers, not parameters: the size that picks the default math
    threads (limits.default_math_threads) still counts them."""
    assert served_parameters(int8.model) == served_parameters(service.model)
    assert served_parameters(int8.model) > count_parameters(int8.model)
