"""The continuous-batching engine and its decoder, with the real committed model (no HTTP)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lib.inference import (
    EngineObserver,
    GenerationFailed,
    GenerationParams,
    GenerationResult,
    InferenceService,
    QueueFull,
)
from lib.inference.decoder import GPT2SlotDecoder
from lib.inference.limits import ALL_CORES_FROM_PARAMETERS, available_cores, default_math_threads
from lib.inference.prompts import encode_prompts
from lib.inference.sampling import SamplingTensors, sample_next
from ml_service.settings import Settings
from tests.helpers import (
    CHECKPOINT,
    Recorder,
    check_a_cancelled_caller_frees_its_row,
    is_russian,
    until,
    with_engine,
)

PROMPTS = [
    "Привет, мир!",
    "Москва — столица",
    "Он открыл дверь и",
    "В начале было слово",
    "Мы долго шли по лесу, пока",
    "Она",
    "Вчера вечером",
    "Когда я был маленьким,",
]


def run(coro):
    return asyncio.run(coro)


# -- the decoder ----------------------------------------------------------------------------------
@pytest.mark.parametrize("library", ["torch", "onednn"])
def test_decoder_logits_equal_the_model_forward(service, library):
    """Prefill, decode at different positions per row, and a row moved to another slot; with
    torch's own matrix products and with oneDNN's (and its fused GELU) for every row count."""
    model, tok = service.model, service.tokenizer
    prompts = encode_prompts(tok, PROMPTS[:3])
    dec = GPT2SlotDecoder(model, library="auto" if library == "onednn" else "torch")
    if library == "onednn" and torch.backends.mkldnn.is_available():  # x86 and arm64 torch
        assert dec.library == "onednn", "oneDNN's linear failed its start-up check"
        assert dec._fused_gelu == "tanh"  # the MLP's GELU runs inside oneDNN's product
    assert dec.library == library or not torch.backends.mkldnn.is_available()
    dec.reserve(3, 64)
    with torch.inference_mode():
        logits = dec.prefill(prompts, 0)
        for ids, row in zip(prompts, logits, strict=True):
            ref = model(torch.tensor([ids])).logits[0, -1]
            assert torch.allclose(row, ref, atol=1e-4)
        nxt = logits.argmax(-1)
        seqs = [ids + [int(t)] for ids, t in zip(prompts, nxt, strict=True)]
        dec.move(2, 0)  # row 0 leaves: row 2 takes its slot
        seqs = [seqs[2], seqs[1]]
        step = dec.decode(torch.tensor([s[-1] for s in seqs]), [len(s) - 1 for s in seqs])
        for ids, row in zip(seqs, step, strict=True):
            ref = model(torch.tensor([ids])).logits[0, -1]
            assert torch.allclose(row, ref, atol=1e-4)


def test_bfloat16_weights_decode_like_the_bfloat16_model():
    """ML_SERVICE_DTYPE=bfloat16: the decoder (oneDNN's bf16 GEMM where available) gives the
    logits of the bf16 model's own forward, and greedy text is still Russian."""
    bf16 = InferenceService.from_checkpoint(CHECKPOINT, dtype=torch.bfloat16)
    prompts = encode_prompts(bf16.tokenizer, PROMPTS[:2])
    with torch.inference_mode():
        logits = GPT2SlotDecoder(bf16.model).prefill(prompts, 0)
        for ids, row in zip(prompts, logits, strict=True):
            ref = bf16.model(torch.tensor([ids])).logits[0, -1].float()
            assert torch.allclose(row, ref, atol=0.05)
    text = bf16.generate("Привет, мир!", GenerationParams(max_new_tokens=16, temperature=0)).text
    assert is_russian(text), text


def test_repetition_penalty_touches_exactly_the_seen_tokens():
    """The penalty gathers and scatters the seen ids (repeats and padding included); it must give
    what the dense rule gives: logit / p where positive, logit * p where not, on seen tokens only."""
    g = torch.Generator().manual_seed(3)
    vocab = 50
    logits = torch.randn((3, vocab), generator=g) * 4
    history = torch.tensor([[0, 7, 7, 9, 0, 0], [0, 1, 2, 3, 4, 5], [0, 49, 0, 0, 0, 0]])
    params = [
        GenerationParams(temperature=0, repetition_penalty=1.5),
        GenerationParams(temperature=0, repetition_penalty=1.0),
        GenerationParams(temperature=0, repetition_penalty=0.7),
    ]
    penalty = torch.tensor([1.5, 1.0, 0.7])[:, None]
    seen = torch.zeros((3, vocab), dtype=torch.bool).scatter_(1, history, True)
    dense = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    got = logits.clone()
    picked, bad = sample_next(got, history, SamplingTensors.build(params, vocab, "cpu"), None)
    assert not bad.any()
    assert torch.equal(got, dense)
    assert picked.tolist() == dense.argmax(-1).tolist()
    assert not torch.equal(dense[0], logits[0]) and torch.equal(dense[1], logits[1])


def _reference_draw(logits: torch.Tensor, p: GenerationParams, u: float) -> int:
    """One row's token by the definition, in float64 and plain Python: temperature, the top_k best
    (renormalised), the top-p nucleus, then the first token whose cumulative mass reaches u times
    the mass kept, counting from the most likely."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    if 0 < p.top_k < len(order):
        order = order[: p.top_k]
    scaled = torch.tensor([float(logits[i]) for i in order], dtype=torch.float64) / p.temperature
    probs = torch.softmax(scaled, dim=0).tolist()
    kept, before = [], 0.0
    for i, q in zip(order, probs, strict=True):
        if before > p.top_p:
            break
        kept.append((i, q))
        before += q
    target, total = u * sum(q for _, q in kept), 0.0
    for i, q in kept:
        total += q
        if total >= target:
            return i
    return kept[-1][0]


def test_sampling_narrow_and_wide_rows_follow_the_definition():
    """The sampler's two paths (topk candidates for small top-k; the whole vocabulary sorted for
    top-k off or large) give, for the same uniform number, the token the definition gives, and a
    row's token does not depend on its company."""
    g = torch.Generator().manual_seed(11)
    vocab = 400
    params = [
        GenerationParams(temperature=t, top_k=k, top_p=p, repetition_penalty=1.0)
        for t in (0.7, 1.3)
        for k in (5, 50, 0, 120)
        for p in (0.5, 0.95, 1.0)
    ]
    logits = torch.randn((len(params), vocab), generator=g) * 3
    u = torch.rand(len(params), generator=g)
    history = torch.zeros((len(params), 1), dtype=torch.long)
    together, bad = sample_next(
        logits.clone(), history, SamplingTensors.build(params, vocab, "cpu"), lambda: u
    )
    assert not bad.any()
    for i, p in enumerate(params):
        alone, _ = sample_next(
            logits[i : i + 1].clone(),
            history[:1],
            SamplingTensors.build([p], vocab, "cpu"),
            lambda i=i: u[i : i + 1],
        )
        expected = _reference_draw(logits[i], p, float(u[i]))
        assert int(together[i]) == int(alone[0]) == expected, (i, p)


# -- correctness under batching -------------------------------------------------------------------
def test_every_request_gets_its_own_result_alone_or_among_16(service):
    """Greedy and seeded requests give the same text alone and in a batch of 16 with other
    parameters around them (small top-k, and wide rows: top-k off or above NARROW_TOP_K)."""
    wide_k = {4: 0, 8: 0, 12: 300}  # rows sampled from their whole sorted vocabulary
    params = [
        GenerationParams(max_new_tokens=12 + i, temperature=0)
        if i % 2
        else GenerationParams(
            max_new_tokens=20,
            temperature=0.7 + i / 20,
            top_k=wide_k.get(i, 20 + i),
            top_p=1.0 if i == 8 else 0.9,
            seed=100 + i,
        )
        for i in range(16)
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    alone = [service.generate(p, q) for p, q in zip(prompts, params, strict=True)]

    async def body(engine):
        items = [service.prepare(p, q) for p, q in zip(prompts, params, strict=True)]
        return await asyncio.gather(*(engine.submit(i) for i in items))

    rec = Recorder()
    together = run(with_engine(service, body, observer=rec, max_wait_s=0.05))
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert max(rec.batch_sizes) == 16  # they really shared the batch


def test_a_waiting_request_joins_the_running_batch(service):
    """Continuous batching: a short request sent while a long one runs finishes long before it,
    without waiting for the long one."""
    long_p = GenerationParams(max_new_tokens=200, min_new_tokens=200, temperature=0.8, seed=1)
    short_p = GenerationParams(max_new_tokens=4, min_new_tokens=4, temperature=0)
    expected_short = service.generate("Москва", short_p).text

    async def body(engine):
        long_task = asyncio.ensure_future(engine.submit(service.prepare("Он открыл", long_p)))
        await until(lambda: engine.running > 0, "the long request runs")
        short = await engine.submit(service.prepare("Москва", short_p))
        assert not long_task.done(), "the short request waited for the long one"
        assert engine.running == 1  # the short row left at once; the long one goes on
        return short, await long_task

    short, long_ = run(with_engine(service, body))
    assert short.text == expected_short and short.completion_tokens == 4
    assert long_.completion_tokens == 200 and long_.finish_reason == "length"


def test_rows_with_stop_strings_and_budgets_leave_independently(service):
    params = [
        GenerationParams(max_new_tokens=40, temperature=0, stop=(" ",)),
        GenerationParams(max_new_tokens=3, min_new_tokens=3, temperature=0),
        GenerationParams(max_new_tokens=30, min_new_tokens=30, temperature=1.0, seed=5),
    ]

    async def body(engine):
        items = [service.prepare("Он открыл дверь и", p) for p in params]
        return await engine.submit_many(items)

    stopped, short, long_ = run(with_engine(service, body))
    assert stopped.finish_reason == "stop" and " " not in stopped.text
    assert short.finish_reason == "length" and short.completion_tokens == 3
    assert long_.completion_tokens == 30 and is_russian(long_.text)


# -- streaming ------------------------------------------------------------------------------------
def test_stream_pieces_add_up_to_the_result(service):
    params = GenerationParams(max_new_tokens=40, min_new_tokens=40, temperature=0.9, seed=11)
    expected = service.generate("Привет, мир!", params)

    async def body(engine):
        pieces, final = [], None
        async for event in engine.stream(service.prepare("Привет, мир!", params)):
            if isinstance(event, str):
                pieces.append(event)
            else:
                final = event
        return pieces, final

    pieces, final = run(with_engine(service, body))
    assert len(pieces) > 5  # really incremental
    assert "".join(pieces) == final.text == expected.text
    assert final.completion_tokens == 40


def test_a_reader_that_fell_behind_gets_the_backlog_as_one_piece(service):
    params = GenerationParams(max_new_tokens=20, min_new_tokens=20, temperature=0)

    async def body(engine):
        stream = engine.stream(service.prepare("Москва", params))
        # the whole generation is delivered (its result is queued last) before the first read
        queued = stream._events._queue
        await until(
            lambda: queued and isinstance(queued[-1], GenerationResult),
            "the whole generation is delivered",
        )
        return [event async for event in stream]

    events = run(with_engine(service, body))
    assert len(events) == 2 and isinstance(events[0], str)
    assert events[0] == events[1].text and events[1].completion_tokens == 20


def test_stream_never_shows_text_past_a_stop_string(service):
    free = service.generate(
        "Он открыл дверь и", GenerationParams(max_new_tokens=30, min_new_tokens=30, temperature=0)
    )
    words = free.text.split()
    assert len(words) >= 3
    stop = " " + words[2]  # a stop string in the middle of the greedy text
    params = GenerationParams(max_new_tokens=30, min_new_tokens=30, temperature=0, stop=(stop,))

    async def body(engine):
        events = [e async for e in engine.stream(service.prepare("Он открыл дверь и", params))]
        return events[:-1], events[-1]

    pieces, final = run(with_engine(service, body))
    assert final.finish_reason == "stop" and stop not in final.text
    assert "".join(pieces) == final.text == free.text[: free.text.index(stop)]


# -- cancellation, limits, failures ---------------------------------------------------------------
def test_a_cancelled_caller_frees_its_row(service):
    check_a_cancelled_caller_frees_its_row(service)


QUEUED = GenerationParams(max_new_tokens=100, min_new_tokens=100, temperature=0)


async def one_running_one_waiting(engine, service):
    """With one row and one queue place: a running request, then a waiting one (both tasks)."""
    first = asyncio.ensure_future(engine.submit(service.prepare("Москва", QUEUED)))
    await until(lambda: engine.running > 0, "the first request runs")
    second = asyncio.ensure_future(engine.submit(service.prepare("Он", QUEUED)))
    await until(lambda: engine.waiting == 1, "the second request waits")
    return first, second


def test_a_full_queue_refuses_at_once(service):
    async def body(engine):
        first, second = await one_running_one_waiting(engine, service)
        assert engine.waiting == 1 and not engine.has_room()
        with pytest.raises(QueueFull):
            await engine.submit(service.prepare("Она", QUEUED))
        return await first, await second

    first, second = run(with_engine(service, body, max_batch_size=1, max_queue=1))
    assert first.completion_tokens == second.completion_tokens == 100


def test_a_request_cancelled_while_waiting_gives_its_queue_place_up(service):
    async def body(engine):
        first, waiting = await one_running_one_waiting(engine, service)
        waiting.cancel()  # its client timed out or went away while it waited
        # the cancelled one no longer holds the only place
        await until(engine.has_room, "the cancelled request gave its place up")
        third = await engine.submit(service.prepare("Она", QUEUED))
        return await first, third

    first, third = run(with_engine(service, body, max_batch_size=1, max_queue=1))
    assert first.completion_tokens == third.completion_tokens == 100


def test_a_model_failure_fails_its_batch_and_the_engine_goes_on(service, model_failure):
    params = GenerationParams(max_new_tokens=8, temperature=0)
    expected = service.generate("Москва", params).text

    async def body(engine):
        model_failure["on"] = True
        outcomes = await asyncio.gather(
            *(engine.submit(service.prepare(p, params)) for p in PROMPTS[:3]),
            return_exceptions=True,
        )
        model_failure["on"] = False  # the model recovers: the same engine serves again
        after = await engine.submit(service.prepare("Москва", params))
        return outcomes, after

    outcomes, after = run(with_engine(service, body))
    assert all(isinstance(o, GenerationFailed) for o in outcomes), outcomes
    assert after.text == expected


@pytest.mark.parametrize("threads", [1, 2])
def test_the_engine_thread_does_the_math_with_its_own_thread_count(service, threads, monkeypatch):
    """ML_SERVICE_TORCH_THREADS reaches the decoding thread (the observer runs on it); the
    settings take OMP_NUM_THREADS when it is not set, and the engine's own default depends on the
    model's size (every core from ALL_CORES_FROM_PARAMETERS on, else all but one), whatever the
    environment says."""
    seen = []

    class Threads(EngineObserver):
        def on_step(self, batch_size, seconds):
            seen.append(torch.get_num_threads())

    async def body(engine):
        return await engine.submit(service.prepare("Москва", GenerationParams(max_new_tokens=3)))

    run(with_engine(service, body, observer=Threads(), threads=threads))
    assert seen and set(seen) == {threads}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    small = max(1, available_cores() - 1)  # the default model has 1.35 M parameters
    assert service.create_engine().threads == small == default_math_threads(1_350_000)
    assert default_math_threads(ALL_CORES_FROM_PARAMETERS) == available_cores()
    assert default_math_threads() == small  # size unknown: as a small model
    monkeypatch.delenv("ML_SERVICE_TORCH_THREADS", raising=False)
    assert Settings().torch_threads == 3
    monkeypatch.setenv("ML_SERVICE_TORCH_THREADS", "2")
    assert Settings().torch_threads == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("ML_SERVICE_TORCH_THREADS")
    assert Settings().torch_threads is None
