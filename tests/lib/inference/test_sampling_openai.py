"""The OpenAI-style decoding options of `lib.inference`: presence/frequency penalties, logit bias,
ignore_eos, raw logprobs of generated tokens, prompt logprobs (echo) and prompts given as ids."""

from __future__ import annotations

import asyncio
import collections

import pytest
import torch
from transformers import AutoModelForCausalLM

from lib.inference import (
    GenerationFailed,
    GenerationParams,
    InvalidTokens,
    PromptTooLong,
    TokenLogprob,
)
from lib.inference import generation as generation_module
from lib.inference import sampling as sampling_module
from lib.inference.decoder import GPT2SlotDecoder
from lib.inference.generation import DecodeBatch, GenerationRequest
from lib.inference.sampling import SamplingTensors, generated_counts, sample_next
from tests.helpers import CHECKPOINT

GREEDY = dict(temperature=0, repetition_penalty=1.0, min_new_tokens=0)  # the raw argmax


@pytest.fixture(scope="module")
def plain_model():
    """The checkpoint under plain transformers, no project code."""
    return AutoModelForCausalLM.from_pretrained(str(CHECKPOINT)).eval()


def _reference_logits(
    logits: torch.Tensor, seen: list[int], generated: list[int], p: GenerationParams
) -> torch.Tensor:
    """One row's processed logits by the definition, in float64: the repetition penalty on the
    seen ids, then + bias - presence * (count > 0) - frequency * count over the generated ids."""
    out = logits.double().clone()
    for t in set(seen):
        v = float(out[t])
        out[t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
    for t, n in collections.Counter(generated).items():
        out[t] -= p.presence_penalty + p.frequency_penalty * n
    for t, b in p.logit_bias:
        out[t] += b
    return out


# -- the sampler ------------------------------------------------------------------------------------
def _penalty_case():
    g = torch.Generator().manual_seed(7)
    vocab = 60
    prompt = [[0, 3, 4, 5], [0, 9, 9, 10], [0, 3], [0, 1, 2, 11], [0, 20, 21]]
    generated = [[7, 7, 8, 3, 7], [9, 12], [], [13, 13, 13, 13], [30, 31, 30]]
    params = [
        GenerationParams(temperature=0, repetition_penalty=1.0, presence_penalty=1.5),
        GenerationParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.7),
        GenerationParams(temperature=0, repetition_penalty=1.0),  # none: untouched
        GenerationParams(
            temperature=0.9,
            repetition_penalty=1.0,
            presence_penalty=-0.5,  # negative: encourages
            frequency_penalty=0.4,
            logit_bias=((13, 2.0), (40, -100.0)),
        ),
        GenerationParams(temperature=0.7, top_k=0, frequency_penalty=2.0, seed=3),
    ]
    T = max(len(a) + len(b) for a, b in zip(prompt, generated, strict=True))
    history = torch.zeros((len(params), T), dtype=torch.long)
    spans = []
    for i, (a, b) in enumerate(zip(prompt, generated, strict=True)):
        row = a + b
        history[i].fill_(a[0])  # padded with the first prompt token, as DecodeBatch does
        history[i, : len(row)] = torch.tensor(row)
        spans.append([len(a), len(row)])
    logits = torch.randn((len(params), vocab), generator=g) * 3
    logits[:, 7] = logits[:, 13] = logits[:, 30] = 6.0  # penalised tokens that lead otherwise
    u = torch.rand(len(params), generator=g)
    return vocab, prompt, generated, params, history, torch.tensor(spans), logits, u


def test_generated_counts_count_only_the_generated_span():
    vocab, _, generated, _, history, spans, _, _ = _penalty_case()
    counts = generated_counts(history, spans, vocab)
    for i, gen in enumerate(generated):
        expected = torch.zeros(vocab)
        for t, n in collections.Counter(gen).items():
            expected[t] = n
        assert torch.equal(counts[i], expected), i


def test_presence_frequency_and_bias_follow_the_definition_alone_and_batched():
    """The processed logits equal the float64 definition; every row's token is the same alone and
    in the batch (rows with and without the penalties side by side), and a greedy row's token is
    the definition's arg-max."""
    vocab, prompt, generated, params, history, spans, logits, u = _penalty_case()
    sp = SamplingTensors.build(params, vocab, "cpu")
    assert sp.additive and sp.any_counts and sp.count_rows.tolist() == [0, 1, 3, 4]
    got = logits.clone()
    together, bad = sample_next(got, history, sp, lambda: u, spans)
    assert not bad.any()
    for i, p in enumerate(params):
        seen = prompt[i] + generated[i]
        ref = _reference_logits(logits[i], seen, generated[i], p)
        assert torch.allclose(got[i].double(), ref, atol=1e-5), i
        if p.temperature == 0:
            assert int(together[i]) == int(ref.argmax())
        alone, _ = sample_next(
            logits[i : i + 1].clone(),
            history[i : i + 1],
            SamplingTensors.build([p], vocab, "cpu"),
            lambda i=i: u[i : i + 1],
            spans[i : i + 1],
        )
        assert int(alone[0]) == int(together[i]), i
    assert torch.equal(got[2], logits[2])  # the row without any of them is untouched
    assert int(together[0]) != 7  # the presence penalty moved the greedy row off its repeat


def test_penalties_need_the_spans():
    vocab, _, _, params, history, _, logits, u = _penalty_case()
    with pytest.raises(ValueError, match="spans"):
        sample_next(logits, history, SamplingTensors.build(params, vocab, "cpu"), lambda: u)


def test_default_params_build_none_of_the_new_tensors():
    sp = SamplingTensors.build([GenerationParams(), GenerationParams(temperature=0)], 100, "cpu")
    assert not sp.additive and not sp.any_counts
    assert sp.bias is None and sp.presence is None and sp.logprob_rows is None


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_row_fails_alone_beside_penalised_rows(poison):
    vocab, _, _, params, history, spans, logits, u = _penalty_case()
    sp = SamplingTensors.build(params, vocab, "cpu")
    clean, _ = sample_next(logits.clone(), history, sp, lambda: u, spans)
    logits[1, 17] = poison
    tokens, bad = sample_next(logits.clone(), history, sp, lambda: u, spans)
    assert bad.tolist() == [False, True, False, False, False]
    assert [int(t) for i, t in enumerate(tokens) if i != 1] == [
        int(t) for i, t in enumerate(clean) if i != 1
    ]


def test_params_normalise_logit_bias_and_check_logprobs():
    p = GenerationParams(logit_bias={5: -100, 7: 3})
    assert p.logit_bias == ((5, -100.0), (7, 3.0))
    assert GenerationParams(logit_bias=((5, 1), (5, 2))).logit_bias == ((5, 2.0),)  # last wins
    assert hash(p) == hash(GenerationParams(logit_bias=((5, -100.0), (7, 3.0))))
    assert GenerationParams(logprobs=0).logprobs == 0
    with pytest.raises(ValueError, match="logprobs"):
        GenerationParams(logprobs=21)
    with pytest.raises(ValueError, match="logprobs"):
        GenerationParams(logprobs=-1)


# -- generation with the real model -------------------------------------------------------------
def test_penalised_greedy_generation_follows_the_definition(service, plain_model):
    """Step by step against plain transformers' logits with the penalties applied by hand (float64):
    the same greedy tokens. The counts cover the generated tokens only, not the prompt."""
    tok = service.tokenizer
    prompt = tok.eos_token + "Он открыл дверь и"
    ids = tok(prompt)["input_ids"]
    p = GenerationParams(
        max_new_tokens=14,
        min_new_tokens=14,
        temperature=0,
        repetition_penalty=1.1,
        presence_penalty=0.8,
        frequency_penalty=0.6,
        logit_bias=((12, 1.5),),
    )
    got = service.generate("Он открыл дверь и", p)
    seq, generated = list(ids), []
    with torch.inference_mode():
        for _ in range(14):
            logits = plain_model(torch.tensor([seq])).logits[0, -1]
            logits[tok.eos_token_id] = -torch.inf  # min_new_tokens
            token = int(_reference_logits(logits, seq, generated, p).argmax())
            seq.append(token)
            generated.append(token)
    assert got.token_ids == generated
    plain = service.generate(
        "Он открыл дверь и", GenerationParams(max_new_tokens=14, min_new_tokens=14, temperature=0)
    )
    assert plain.token_ids != got.token_ids  # the penalties really acted


def test_rows_with_and_without_penalties_give_their_alone_text_in_a_batch(service):
    prompts = ["Привет, мир!", "Москва — столица", "Он открыл дверь и", "В начале было слово"]
    params = [
        GenerationParams(max_new_tokens=16, temperature=0, frequency_penalty=1.0),
        GenerationParams(max_new_tokens=16, temperature=0),
        GenerationParams(max_new_tokens=16, temperature=0.9, seed=4, presence_penalty=1.2),
        GenerationParams(max_new_tokens=16, temperature=0.8, seed=5, logit_bias={12: -100}),
    ]
    alone = [service.generate(t, p) for t, p in zip(prompts, params, strict=True)]
    together = service.generate_batch(prompts, params)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]


def test_logit_bias_bans_and_forces_tokens_under_greedy(service):
    free = service.generate("Он открыл дверь и", GenerationParams(max_new_tokens=10, **GREEDY))
    first = free.token_ids[0]
    banned = service.generate(
        "Он открыл дверь и",
        GenerationParams(max_new_tokens=10, logit_bias={first: -100}, **GREEDY),
    )
    assert first not in banned.token_ids and banned.completion_tokens > 0
    forced_id = service.tokenizer(" Москва")["input_ids"][0]
    forced = service.generate(
        "Он открыл дверь и",
        GenerationParams(max_new_tokens=6, temperature=0, logit_bias={forced_id: 100}),
    )
    assert forced.token_ids == [forced_id] * 6 and forced.finish_reason == "length"


def _plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of plain transformers' logits at every position of `ids` (T, vocab)."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def test_logprobs_are_the_raw_model_logprobs(service, plain_model):
    """Greedy rows: each generated token's logprob is log_softmax of plain transformers' logits at
    that step; `top` is sorted, as long as asked, and its first entry is the greedy token. A
    sampled, penalised row in the same batch gets its raw numbers too (before penalties, bias and
    temperature), and a row that does not ask gets None."""
    tok = service.tokenizer
    prompts = ["Когда мы вышли из дома, на улице", "Москва — столица", "Он открыл дверь и"]
    params = [
        GenerationParams(max_new_tokens=6, logprobs=5, **GREEDY),
        GenerationParams(max_new_tokens=6, **GREEDY),
        GenerationParams(
            max_new_tokens=6,
            temperature=0.7,
            seed=2,
            presence_penalty=1.0,
            logit_bias={12: 5.0},
            logprobs=0,
        ),
    ]
    results = service.generate_batch(prompts, params)
    assert results[1].logprobs is None and results[1].token_ids
    for i in (0, 2):
        r = results[i]
        assert len(r.logprobs) == len(r.token_ids) == r.completion_tokens > 0
        ids = [tok.eos_token_id] + tok(prompts[i])["input_ids"]
        start = len(ids)
        ref = _plain_logprobs(plain_model, ids + r.token_ids)
        for j, entry in enumerate(r.logprobs):
            assert isinstance(entry, TokenLogprob) and entry.token_id == r.token_ids[j]
            assert entry.logprob == pytest.approx(
                float(ref[start - 1 + j, entry.token_id]), abs=1e-4
            )
            assert len(entry.top) == params[i].logprobs
            values = [lp for _, lp in entry.top]
            assert values == sorted(values, reverse=True)
            if params[i].temperature == 0:
                assert entry.top[0][0] == entry.token_id
                best = ref[start - 1 + j].topk(5)
                assert [t for t, _ in entry.top] == best.indices.tolist()
                assert values == pytest.approx(best.values.tolist(), abs=1e-4)
    alone = service.generate(prompts[0], params[0])
    assert alone.token_ids == results[0].token_ids
    assert [e.logprob for e in alone.logprobs] == pytest.approx(
        [e.logprob for e in results[0].logprobs], abs=1e-5
    )


def test_token_ids_and_logprobs_cover_tokens_a_stop_string_cut(service):
    held = {**GREEDY, "min_new_tokens": 30}  # argmax, with the end of text held off
    free = service.generate("Он открыл дверь и", GenerationParams(max_new_tokens=30, **held))
    words = free.text.split()
    stop = " " + words[2]
    r = service.generate(
        "Он открыл дверь и",
        GenerationParams(max_new_tokens=30, stop=(stop,), logprobs=1, **held),
    )
    assert r.finish_reason == "stop" and stop not in r.text
    assert len(r.token_ids) == len(r.logprobs) == r.completion_tokens
    decoded = service.tokenizer.decode(r.token_ids)
    assert decoded.startswith(r.text) and stop in decoded  # the cut text's tokens are counted
    assert r.token_ids == free.token_ids[: len(r.token_ids)]


# -- prompts as ids, prompt logprobs ------------------------------------------------------------
def test_prepare_ids_is_prepare_for_token_ids(service):
    text, p = "Москва — столица", GenerationParams(max_new_tokens=8, **GREEDY)
    ids = service.tokenizer(text)["input_ids"]
    prepared = service.prepare_ids(ids, p)
    assert prepared == service.prepare(text, p)
    assert prepared.ids[0] == service.tokenizer.eos_token_id
    (r,) = service.generate_prepared([prepared])
    assert r.text == service.generate(text, p).text


@pytest.mark.parametrize("bad", [-1, 4096, 10**9])
def test_prepare_ids_refuses_ids_outside_the_vocabulary(service, bad):
    assert service.vocab_size == 4096
    p = GenerationParams(max_new_tokens=4)
    with pytest.raises(InvalidTokens, match="outside the vocabulary") as e:
        service.prepare_ids([5, bad, 7], p)
    assert isinstance(e.value, ValueError)
    with pytest.raises(InvalidTokens, match="logit_bias"):
        service.prepare_ids([5, 7], GenerationParams(logit_bias={bad: 1.0}))
    with pytest.raises(InvalidTokens, match="logit_bias"):
        service.prepare("Москва", GenerationParams(logit_bias={bad: 1.0}))
    with pytest.raises(InvalidTokens):
        service.prepare_ids([5, "7"], p)
    with pytest.raises(InvalidTokens):
        service.prompt_logprobs([5, bad], 1)


def test_prepare_ids_refuses_prompts_too_long(service):
    ctx = service.context_length
    p = GenerationParams(max_new_tokens=10)
    assert len(service.prepare_ids([5] * (ctx - 10), p).ids) == ctx - 9
    with pytest.raises(PromptTooLong, match="exceeds the context"):
        service.prepare_ids([5] * (ctx - 9), p)


def test_prompt_logprobs_are_the_score_services_numbers(service):
    text = "Москва — столица России, и в ней живёт много людей."
    ids = service.tokenizer(text)["input_ids"]
    entries = service.prompt_logprobs(ids, 3)
    score = service.score([text])[0]
    assert len(entries) == len(ids) == len(score.logprobs)
    assert entries[0] is None  # OpenAI's echo: the first token has nothing before it
    assert [e.token_id for e in entries[1:]] == ids[1:]
    assert [e.logprob for e in entries[1:]] == pytest.approx(score.logprobs[1:], abs=1e-5)
    for e in entries[1:]:
        assert len(e.top) == 3
        values = [lp for _, lp in e.top]
        assert values == sorted(values, reverse=True) and values[0] >= e.logprob - 1e-6
    assert all(e.top == [] for e in service.prompt_logprobs(ids, 0)[1:])
    assert service.prompt_logprobs([], 2) == []


def test_prompt_logprobs_refuse_what_exceeds_the_context(service):
    ctx = service.context_length
    assert len(service.prompt_logprobs([5] * (ctx - 1), 0)) == ctx - 1
    with pytest.raises(PromptTooLong):
        service.prompt_logprobs([5] * ctx, 0)


# -- isolation: retried steps, failing rows ---------------------------------------------------------
def _batch(service, prompts, params) -> tuple[DecodeBatch, list[GenerationRequest]]:
    tok = service.tokenizer
    requests = [
        GenerationRequest([tok.eos_token_id] + tok(t)["input_ids"], p)
        for t, p in zip(prompts, params, strict=True)
    ]
    return DecodeBatch(service.model, tok, max_rows=len(requests)), requests


OPENAI_ROWS = [
    GenerationParams(max_new_tokens=10, temperature=0, frequency_penalty=0.9, logprobs=2),
    GenerationParams(max_new_tokens=10, temperature=0.8, seed=9, presence_penalty=0.7, logprobs=0),
    GenerationParams(max_new_tokens=10, temperature=0.6, seed=3, logit_bias={12: -100}),
]
OPENAI_PROMPTS = ["Привет, мир!", "Москва — столица", "Он открыл дверь и"]


def test_choose_has_no_side_effects_with_the_new_options(service):
    batch, requests = _batch(service, OPENAI_PROMPTS, OPENAI_ROWS)
    with torch.inference_mode():
        batch.admit(requests)
        for _ in range(4):
            batch.step()
        ids = torch.tensor([row.generated[-1] for row in batch.rows])
        logits = batch.decoder.decode(ids, [row.position for row in batch.rows])
        history = batch.history.clone()
        state = [(list(r.generated), list(r.logprobs or []), r.peek_uniform()) for r in batch.rows]
        first = batch._choose(batch.rows, logits.clone(), batch.history)
        again = batch._choose(batch.rows, logits.clone(), batch.history)
    assert torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])
    assert first[3] == again[3] and sorted(first[3]) == [0, 1]
    assert torch.equal(batch.history, history)
    assert state == [
        (list(r.generated), list(r.logprobs or []), r.peek_uniform()) for r in batch.rows
    ]


def test_a_row_that_makes_the_model_raise_fails_alone_beside_the_new_options(service, monkeypatch):
    """The retried step (each row alone, then the others again) keeps every other row's tokens,
    counts and logprobs as they are alone: nothing is counted or recorded twice."""
    alone = [service.generate(t, p) for t, p in zip(OPENAI_PROMPTS, OPENAI_ROWS, strict=True)]
    long_prompt = "Мы долго шли по лесу, пока не вышли к реке, где стоял старый дом. " * 3
    at = len(service.tokenizer(long_prompt)["input_ids"]) + 3  # the long row's 4th new token
    decode = GPT2SlotDecoder.decode

    def bad_decode(self, ids, positions, *args, **kwargs):
        if max(positions) >= at:
            raise RuntimeError("device-side assert triggered")
        return decode(self, ids, positions, *args, **kwargs)

    monkeypatch.setattr(GPT2SlotDecoder, "decode", bad_decode)
    prompts = [OPENAI_PROMPTS[0], long_prompt, *OPENAI_PROMPTS[1:]]
    params = [
        OPENAI_ROWS[0],
        GenerationParams(max_new_tokens=12, seed=5, ignore_eos=True, logprobs=1),
        *OPENAI_ROWS[1:],
    ]  # (it must live to its 4th token)
    batch, requests = _batch(service, prompts, params)
    batch.admit(requests)
    while batch.rows:
        batch.step()
    assert isinstance(requests[1].error, GenerationFailed)
    got = [requests[i].result for i in (0, 2, 3)]
    assert [r.token_ids for r in got] == [r.token_ids for r in alone]
    for r, a in zip(got, alone, strict=True):
        assert (r.logprobs is None) == (a.logprobs is None)
        if r.logprobs is not None:
            assert len(r.logprobs) == len(r.token_ids)
            assert [e.token_id for e in r.logprobs] == r.token_ids


def test_the_default_path_does_none_of_the_new_work(service, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the default path ran the new options' code")

    monkeypatch.setattr(sampling_module, "_add_bias_and_penalties", never)
    monkeypatch.setattr(sampling_module, "_generated", never)
    monkeypatch.setattr(generation_module, "token_logprobs", never)
    results = service.generate_batch(
        ["Привет, мир!", "Москва"],
        [GenerationParams(max_new_tokens=5), GenerationParams(max_new_tokens=5, temperature=0)],
    )
    assert all(r.completion_tokens > 0 and r.logprobs is None for r in results)


def test_the_engine_serves_prepared_ids_with_the_new_options(service):
    """What the HTTP layer does: ids through `prepare_ids`, the engine's batch, results with ids
    and logprobs equal to the library's."""
    tok = service.tokenizer
    items = [
        service.prepare_ids(tok(t)["input_ids"], p)
        for t, p in zip(OPENAI_PROMPTS, OPENAI_ROWS, strict=True)
    ]
    expected = service.generate_prepared(items)

    async def body():
        engine = service.create_engine(max_batch_size=4)
        engine.start()
        try:
            return await engine.submit_many(items)
        finally:
            engine.stop()

    got = asyncio.run(body())
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.text for r in got] == [r.text for r in expected]
    assert [len(r.logprobs) if r.logprobs is not None else None for r in got] == [
        len(expected[0].token_ids),
        len(expected[1].token_ids),
        None,
    ]
