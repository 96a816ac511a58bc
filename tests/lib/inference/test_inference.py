"""InferenceService and the decoding loop, with the real committed model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lib.checkpoint import read_card
from lib.inference import GenerationParams, InferenceService, PromptTooLong
from lib.presets import DEFAULT_CHECKPOINT
from tests.helpers import CHECKPOINT, is_russian

GREEDY = GenerationParams(max_new_tokens=20, temperature=0)


def test_default_checkpoint_is_complete_hf_directory():
    names = {p.name for p in DEFAULT_CHECKPOINT.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "training_card.json",
    } <= names
    card = read_card(DEFAULT_CHECKPOINT)
    for key in (
        "data",
        "preset",
        "steps",
        "tokens_seen",
        "wall_clock_s",
        "val_loss",
        "val_bits_per_byte",
    ):
        assert key in card, key
    size = sum(p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir())
    assert size <= 25 * 1024 * 1024


def test_default_checkpoint_loads_with_plain_transformers():
    """No project code: any tool of the ecosystem can use the model."""
    tok = AutoTokenizer.from_pretrained(str(DEFAULT_CHECKPOINT))
    model = AutoModelForCausalLM.from_pretrained(str(DEFAULT_CHECKPOINT))
    ids = tok(tok.eos_token + "Привет, мир!", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert is_russian(text), text
    # the tied input/output embedding survived the save
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


@pytest.fixture(scope="module")
def plain():
    """The checkpoint under plain transformers, no project code."""
    tok = AutoTokenizer.from_pretrained(str(CHECKPOINT))
    return tok, AutoModelForCausalLM.from_pretrained(str(CHECKPOINT)).eval()


@pytest.mark.parametrize(
    "prompt,penalty,new",
    [("Москва", 1.3, 12), ("Привет, мир!", 1.1, 16), ("Он открыл дверь и", 1.0, 24)],
)
def test_plain_transformers_greedy_matches_service(service, plain, prompt, penalty, new):
    """Guards generation against silent drift: the same greedy text as transformers' own
    `generate` on this machine (a golden string would depend on the CPU's rounding)."""
    tok, model = plain
    ids = tok(tok.eos_token + prompt, return_tensors="pt")
    out = model.generate(
        **ids,
        max_new_tokens=new,
        do_sample=False,
        repetition_penalty=penalty,
        pad_token_id=tok.eos_token_id,
    )
    expected = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    got = service.generate(
        prompt, GenerationParams(max_new_tokens=new, temperature=0, repetition_penalty=penalty)
    )
    assert got.text == expected and got.text
    expected_ids = out[0, ids["input_ids"].shape[1] :].tolist()
    if tok.eos_token_id in expected_ids:  # the result's ids stop before the end of document
        expected_ids = expected_ids[: expected_ids.index(tok.eos_token_id)]
    assert got.token_ids == expected_ids and got.completion_tokens == len(expected_ids)
    assert got.logprobs is None  # not asked


def test_greedy_batch_equals_alone(service):
    prompts = ["Привет, мир!", "Москва — столица", "Он", "В начале было слово, и слово было"]
    alone = [service.generate(p, GREEDY).text for p in prompts]
    assert [r.text for r in service.generate_batch(prompts, GREEDY)] == alone


def test_seeded_rows_are_independent_of_batch_company(service):
    p = GenerationParams(max_new_tokens=16, temperature=1.0, seed=7)
    alone = service.generate("Привет, мир!", p).text
    batch = service.generate_batch(
        ["Москва", "Привет, мир!", "Он открыл"],
        [GenerationParams(max_new_tokens=5, temperature=0.5, seed=1), p, GREEDY],
    )
    assert batch[1].text == alone


def test_per_row_parameters(service):
    rows = service.generate_batch(
        ["Москва"] * 3,
        [
            GenerationParams(max_new_tokens=3, temperature=0),
            GenerationParams(max_new_tokens=12, temperature=0),
            GenerationParams(max_new_tokens=12, temperature=1.2, top_k=5, seed=3),
        ],
    )
    assert rows[0].completion_tokens <= 3 and rows[0].finish_reason in {"length", "eos"}
    assert rows[1].text.startswith(rows[0].text)
    assert all(r.prompt_tokens == rows[0].prompt_tokens for r in rows)


@pytest.mark.parametrize("hold", [{"min_new_tokens": 20}, {"ignore_eos": True}])
def test_min_new_tokens_and_ignore_eos_hold_off_the_end_of_document(service, hold):
    eos = {service.tokenizer.eos_token_id: 6.0}  # the end of document made likely
    free = service.generate(
        "Он сказал",
        GenerationParams(max_new_tokens=20, min_new_tokens=0, temperature=0, logit_bias=eos),
    )
    assert free.finish_reason == "eos" and free.completion_tokens < 20
    held = service.generate(
        "Он сказал", GenerationParams(max_new_tokens=20, temperature=0, logit_bias=eos, **hold)
    )
    assert held.finish_reason == "length" and held.completion_tokens == 20
    assert service.tokenizer.eos_token_id not in held.token_ids
    assert held.token_ids[: free.completion_tokens] == free.token_ids  # greedy: same until then
    assert held.token_ids[: free.completion_tokens] == free.token_ids


def test_top_k_one_is_greedy(service):
    greedy = service.generate("Он открыл дверь", GREEDY).text
    k1 = service.generate(
        "Он открыл дверь", GenerationParams(max_new_tokens=20, temperature=1.5, top_k=1, seed=5)
    )
    assert k1.text == greedy


def test_prompt_too_long_is_refused_not_truncated(service):
    with pytest.raises(PromptTooLong, match="exceeds the context"):
        service.generate("слово " * 2000, GREEDY)


def test_cancellation_stops_generation(service):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 3

    # a seeded sample that runs well past 3 tokens without the model ending the document
    params = GenerationParams(max_new_tokens=50, temperature=0.8, seed=2)
    assert service.generate("Он открыл дверь и", params).completion_tokens > 10
    r = service.generate_batch(["Он открыл дверь и"], params, should_stop)[0]
    assert r.finish_reason == "cancelled" and r.completion_tokens == 3


def test_random_baseline_metadata_is_loud(service):
    baseline = InferenceService.random_baseline("tiny", tokenizer_path=CHECKPOINT)
    meta = baseline.metadata()
    assert meta["random_baseline"] and "RANDOM" in meta["warning"]
    assert (
        baseline.generate("Привет", GenerationParams(max_new_tokens=4, seed=0)).completion_tokens
        >= 1
    )


@torch.inference_mode()
def test_service_metadata_counts_parameters(service):
    assert service.metadata()["parameters"] == sum(p.numel() for p in service.model.parameters())


# five ordinary prompts, most of them stopped mid-sentence (docs/train.md, "The embedded default model", shows the
# default model's greedy continuations of them)
ORDINARY = [
    "Старый учитель открыл книгу и",
    "Когда мы вышли из дома, на улице",
    "Он сказал, что",
    "В лесу было тихо, и только",
    "Моя мама работает",
]


@pytest.mark.parametrize("prompt", ORDINARY)
def test_ordinary_prompts_get_ten_tokens_of_russian(service, plain, prompt):
    """Greedy under the service's defaults (`min_new_tokens` 10 among them): Russian text of at
    least ten tokens. And the model itself, by plain transformers without the leading end-of-text
    token (what a user of the checkpoint alone writes) and with no minimum: not an end of text at
    once."""
    r = service.generate(prompt, GenerationParams(max_new_tokens=24, temperature=0))
    assert r.completion_tokens >= 10 and is_russian(r.text), r
    tok, model = plain
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=12, min_new_tokens=0, do_sample=False, pad_token_id=tok.eos_token_id
    )
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    assert new[0] != tok.eos_token_id, tok.decode(new)  # the report: an end of text at once


def test_a_mid_sentence_prompt_does_not_end_at_once_under_the_defaults(client):
    """`/forward` with nothing but the text (sampled, seeded for a fixed test): every answer to a
    prompt cut mid-sentence has more than one token."""
    for prompt in ORDINARY:
        for seed in range(4):
            r = client.post("/forward", json={"text": prompt, "seed": seed})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 1, r.text
