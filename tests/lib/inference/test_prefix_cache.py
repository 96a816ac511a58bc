"""Automatic prefix caching (lib/inference/prefix_cache.py): the blocks, their eviction, and the
engine's outputs with the cache on and off, with the real committed model."""

from __future__ import annotations

import asyncio

import torch

from lib.inference import GenerationParams, InferenceService
from lib.inference.decoder import GPT2SlotDecoder
from lib.inference.generation import DecodeBatch, GenerationRequest
from lib.inference.prefix_cache import BLOCK, PrefixCache, block_names
from lib.inference.prompts import encode_prompts
from tests.helpers import Recorder, perturbed_copy, with_engine

SYSTEM = (
    "Ты — вежливый помощник библиотеки. Отвечай коротко и по-русски, называй книги и авторов, "
    "не выдумывай того, чего не знаешь. "
)
QUESTIONS = [
    "Что почитать о море?",
    "Кто написал «Войну и мир»?",
    "Посоветуй стихи о зиме.",
    "Где найти словарь Даля?",
    "Есть ли у вас Чехов?",
    "Что такое роман?",
    "Какая книга самая длинная?",
    "Можно ли взять книгу домой?",
]
GREEDY = GenerationParams(max_new_tokens=24, temperature=0)
SEEDED = GenerationParams(max_new_tokens=24, temperature=0.9, seed=11)


def batch_of(service, rows: int, mb: int) -> DecodeBatch:
    return DecodeBatch(service.model, service.tokenizer, rows, prefix_cache_bytes=mb << 20)


def cache_for(decoder: GPT2SlotDecoder, mb: int) -> PrefixCache:
    d = decoder
    return PrefixCache(d.layers, d.n_head, d.head_dim, d.dtype, d.device, mb << 20)


# -- the blocks -----------------------------------------------------------------------------------
def test_block_names_name_the_whole_prefix():
    a = list(range(40))
    b = list(range(32)) + [7] * 8
    na, nb = block_names(a), block_names(b)
    assert len(na) == len(nb) == 40 // BLOCK  # whole blocks only
    assert na[:2] == nb[:2]  # the same first 32 tokens
    # the same tokens in a block after a different start: another name (it stands for the prefix)
    shifted = [99] + list(range(1, 40))
    assert block_names(shifted)[1] != na[1]
    assert block_names(a, namespace="adapter-x")[0] != na[0]


def test_store_then_load_copies_the_blocks_back(service):
    dec = GPT2SlotDecoder(service.model)
    ids = encode_prompts(service.tokenizer, [SYSTEM])[0]
    dec.reserve(2, len(ids) + 8)
    dec.prefill([ids], 0)
    cache = cache_for(dec, 8)
    cache.store(ids, dec.k, dec.v, 0)
    places = cache.lookup(ids)
    n = len(places) * BLOCK
    assert places and n == (len(ids) - 1) // BLOCK * BLOCK  # its last token is always left to run
    cache.load(places, dec.k, dec.v, 1)
    for layer in range(dec.layers):
        assert torch.equal(dec.k[layer][1, :, :n], dec.k[layer][0, :, :n])
        assert torch.equal(dec.v[layer][1, :, :n], dec.v[layer][0, :, :n])
    assert cache.lookup(encode_prompts(service.tokenizer, ["Совсем другой текст " * 4])[0]) == []


def test_eviction_takes_the_least_recently_used_ends_first(service):
    dec = GPT2SlotDecoder(service.model)
    cache = cache_for(dec, 0)
    cache.capacity = 4  # four blocks: room for two prefixes of two
    tok = service.tokenizer
    texts = ["Первый длинный текст о море и кораблях, " * 3, "Второй текст о лесе, " * 5]
    seqs = [ids[: 2 * BLOCK + 1] for ids in encode_prompts(tok, texts)]
    third = encode_prompts(tok, ["Третий, о горах и реках, " * 4])[0][: 2 * BLOCK + 1]
    dec.reserve(1, 3 * BLOCK)
    for ids in seqs:
        dec.prefill([ids], 0)
        cache.store(ids, dec.k, dec.v, 0)
    assert [len(cache.lookup(ids)) for ids in seqs] == [2, 2]
    cache.lookup(seqs[1])  # the second prefix is now the most recently used
    dec.prefill([third], 0)
    cache.store(third, dec.k, dec.v, 0)
    assert cache.stats.evictions == 2 and cache.stats.blocks == 4
    assert len(cache.lookup(seqs[0])) == 0  # the least recently used prefix went, end first
    assert len(cache.lookup(seqs[1])) == 2 and len(cache.lookup(third)) == 2


def test_a_budget_smaller_than_a_prefix_keeps_its_start():
    cache = PrefixCache(1, 1, 2, torch.float32, torch.device("cpu"), 0)
    cache.capacity = 2
    k = [torch.randn(1, 1, 4 * BLOCK, 2)]
    ids = list(range(4 * BLOCK))
    cache.store(ids, k, k, 0)
    assert cache.stats.blocks == 2
    assert len(cache.lookup(ids + [1])) == 2  # the first two blocks, not the last two


def test_off_when_the_budget_is_zero(service):
    batch = batch_of(service, 4, 0)
    assert not batch.prefix.enabled
    results = decode_all(
        batch, service.tokenizer, [[SYSTEM + QUESTIONS[0]], [SYSTEM + QUESTIONS[1]]], GREEDY
    )
    assert all(r.cached_tokens == 0 for r in results)


# -- the engine's outputs -------------------------------------------------------------------------
def decode_all(
    batch: DecodeBatch, tokenizer, waves: list[list[str]], params: GenerationParams
) -> list:
    """Admit each wave of prompts once the previous one has finished; the results in order."""
    results = []
    for wave in waves:
        requests = [GenerationRequest(list(p), params) for p in encode_prompts(tokenizer, wave)]
        batch.admit(requests)
        while batch.rows:
            batch.step()
        results += [r.result for r in requests]
    return results


def test_outputs_equal_with_the_cache_on_and_off(service):
    """Greedy and seeded: the same texts whether a prompt's start came from the cache or not;
    the second wave is served from the first's blocks."""
    waves = [[SYSTEM + q for q in QUESTIONS[:2]], [SYSTEM + q for q in QUESTIONS[2:]]]
    for params in (GREEDY, SEEDED):
        off = batch_of(service, 8, 0)
        on = batch_of(service, 8, 16)
        a, b = (
            decode_all(off, service.tokenizer, waves, params),
            decode_all(on, service.tokenizer, waves, params),
        )
        assert [r.text for r in a] == [r.text for r in b]
        # nothing cached yet: one of the first two runs first, the other finds the start
        assert sorted(r.cached_tokens == 0 for r in b[:2]) == [False, True]
        shared = len(encode_prompts(service.tokenizer, [SYSTEM])[0])
        for r in b[2:]:
            assert r.cached_tokens >= (shared - 1) // BLOCK * BLOCK - 1 > 0
            assert r.cached_tokens < r.prompt_tokens


def test_a_finished_conversation_serves_the_next_turn(service):
    """The whole sequence of a finished request is kept: a prompt that continues it (the next
    turn of a chat) finds its generated tokens cached too."""
    batch = batch_of(service, 4, 16)
    first = decode_all(batch, service.tokenizer, [[SYSTEM + QUESTIONS[0]]], GREEDY)[0]
    follow_up = SYSTEM + QUESTIONS[0] + first.text + " Спасибо! А ещё?"
    second = decode_all(batch, service.tokenizer, [[follow_up]], GREEDY)[0]
    prompt_only = len(encode_prompts(service.tokenizer, [SYSTEM + QUESTIONS[0]])[0])
    assert second.cached_tokens > (prompt_only - 1) // BLOCK * BLOCK


def test_sixteen_concurrent_sharing_a_prefix_equal_each_alone(service):
    """Through the engine: 16 requests at once over a shared system prompt (the cache warm from an
    earlier one) give each the text it gives alone with the cache off."""
    prompts = [SYSTEM + QUESTIONS[i % len(QUESTIONS)] + f" ({i})" for i in range(16)]
    params = [GREEDY if i % 2 else SEEDED for i in range(16)]

    async def alone(engine):
        return [
            (await engine.submit(service.prepare(p, pr))).text
            for p, pr in zip(prompts, params, strict=True)
        ]

    async def together(engine):
        await engine.submit(service.prepare(SYSTEM + "Здравствуйте!", GREEDY))  # warms the cache
        jobs = [
            engine.submit(service.prepare(p, pr)) for p, pr in zip(prompts, params, strict=True)
        ]
        return await asyncio.gather(*jobs)

    want = asyncio.run(with_engine(service, alone, prefix_cache_mb=0))
    rec = Recorder()
    got = asyncio.run(with_engine(service, together, prefix_cache_mb=16, observer=rec))
    assert [r.text for r in got] == want
    assert all(r.cached_tokens > 0 for r in got)


def test_the_observer_hears_hits_and_blocks(service):
    seen = []

    class Observer(Recorder):
        def on_prefix_cache(self, prompt_tokens, cached_tokens, evictions, blocks):
            seen.append((prompt_tokens, cached_tokens, evictions, blocks))

    async def body(engine):
        for q in QUESTIONS[:2]:
            await engine.submit(service.prepare(SYSTEM + q, GREEDY))

    asyncio.run(with_engine(service, body, prefix_cache_mb=16, observer=Observer()))
    (p1, c1, e1, b1), (p2, c2, e2, b2) = seen
    assert c1 == 0 < c2 < p2 and e1 == e2 == 0 and 0 < b1 <= b2


def test_another_model_never_reuses_the_blocks(service, tmp_path):
    """A cache belongs to one engine's model: an engine over other weights (a reload, a new
    version) starts empty and gives its own model's text."""
    other = InferenceService.from_checkpoint(perturbed_copy(tmp_path, "v2"))
    prompt = SYSTEM + QUESTIONS[0]

    async def twice(engine, svc):
        a = await engine.submit(svc.prepare(prompt, GREEDY))
        b = await engine.submit(svc.prepare(prompt, GREEDY))
        return a, b

    a1, a2 = asyncio.run(with_engine(service, lambda e: twice(e, service), prefix_cache_mb=16))
    b1, b2 = asyncio.run(with_engine(other, lambda e: twice(e, other), prefix_cache_mb=16))
    assert a1.cached_tokens == 0 < a2.cached_tokens
    assert b1.cached_tokens == 0 < b2.cached_tokens  # the new engine's cache started empty
    assert b1.text == b2.text != a1.text


def test_prompts_arriving_together_compute_their_common_start_once(service):
    """Four prompts with one system prompt, admitted in one go with nothing cached: one runs
    first and the three others find the start in the cache; the texts are those without it."""
    wave = [[SYSTEM + q for q in QUESTIONS[:4]]]
    off = decode_all(batch_of(service, 8, 0), service.tokenizer, wave, GREEDY)
    on = decode_all(batch_of(service, 8, 16), service.tokenizer, wave, GREEDY)
    assert [r.text for r in on] == [r.text for r in off]
    assert sorted(r.cached_tokens > 0 for r in on) == [False, True, True, True]
