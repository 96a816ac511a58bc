"""Structured outputs in the engine (`lib/inference/constraints.py`, the mask in
`generation.py`): constraints are plain, hashable, picklable data; bad ones are refused with a
reason when checked; with the real default model, constrained rows write only what their grammar
allows, end with "stop" when it is complete (or "length", with a prefix), share a batch with free
rows without changing anyone's text, and keep the raw logprobs."""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import asdict

import jsonschema_rs
import pytest

from lib.inference import GenerationParams
from lib.inference.constraints import (
    Constraint,
    InvalidConstraint,
    check_constraint,
    compiler_for,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Москва", "Казань", "Пермь"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["Привет, меня зовут", "Москва", "Он сказал", "Данные:"]


def constrained(c: Constraint | None, **kw) -> GenerationParams:
    return GenerationParams(**{"max_new_tokens": 120, "temperature": 0.8, **kw, "constraint": c})


def test_a_constraint_is_hashable_picklable_plain_data():
    a = Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    b = Constraint.json_schema('{"type": "object",  "properties": {"a": {"type": "integer"}}}')
    assert a == b and hash(a) == hash(b)  # the schema's text is normalised
    assert pickle.loads(pickle.dumps(a)) == a
    p, q = GenerationParams(constraint=a), GenerationParams()
    assert hash(p) != hash(q) and p != q
    assert pickle.loads(pickle.dumps(p)) == p
    assert json.dumps(asdict(p))  # what the response cache's key hashes
    assert Constraint.choice(["да", "нет"]).choices() == ["да", "нет"]
    with pytest.raises(ValueError, match="kind"):
        Constraint("xml", "<a/>")


BAD = [
    (Constraint.json_schema({"type": "objectx"}), "json", "Invalid type"),
    (Constraint.json_schema("{not json"), "json", "not valid JSON"),
    (Constraint.json_schema("[1, 2]"), "json", "a JSON schema is an object"),
    (Constraint.json_schema({"type": "object", "if": {}}), "json", "Unimplemented keys"),
    (Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 3}), "json", "minimum"),
    (Constraint.regex("a["), "regex", "unclosed character class"),
    (Constraint.regex("(?=x)a"), "regex", "look-around"),
    (Constraint.choice([]), "choice", "empty"),
    (Constraint.grammar("start: foo"), "grammar", "unknown name"),
    # compiles, but no token of any vocabulary can write a character of an empty class
    (Constraint.regex(r"[^\x00-\U0010FFFF]"), "regex", "no token can start it"),
]


@pytest.mark.parametrize("bad,field,reason", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_constraints_are_refused_with_their_reason(service, bad, field, reason):
    with pytest.raises(InvalidConstraint, match=re.escape(reason)) as e:
        check_constraint(service.tokenizer, bad, service.vocab_size)
    assert e.value.field == field
    with pytest.raises(InvalidConstraint):  # a cached refusal refuses again
        check_constraint(service.tokenizer, bad, service.vocab_size)


def test_good_constraints_pass_and_the_compiled_tokenizer_is_built_once(service):
    tok = service.tokenizer
    for good in (
        Constraint.json_object(),
        Constraint.json_schema(PERSON),
        Constraint.regex(r"[0-9]{3}"),
        Constraint.choice(["да", "нет"]),
        Constraint.grammar('start: "a" | "b" NUMBER\nNUMBER: /[0-9]+/'),
        Constraint.grammar('root ::= "x" [0-9]+'),  # GBNF
    ):
        check_constraint(tok, good, service.vocab_size)
    first = compiler_for(tok.backend_tokenizer, tok.eos_token_id, service.vocab_size)
    again = compiler_for(tok.backend_tokenizer, tok.eos_token_id, service.vocab_size)
    assert first is again


def test_json_schema_outputs_parse_and_validate(service):
    validator = jsonschema_rs.validator_for(PERSON)
    c = Constraint.json_schema(PERSON)
    params = [constrained(c, seed=i, max_new_tokens=200) for i in range(len(PROMPTS))]
    for r in service.generate_batch(PROMPTS, params):
        assert r.finish_reason == "stop", r
        validator.validate(json.loads(r.text))


def test_choice_and_regex_always_match(service):
    choices = ["да", "нет", "не знаю"]
    seeds = range(8)
    out = service.generate_batch(
        [PROMPTS[i % 4] for i in seeds],
        [constrained(Constraint.choice(choices), seed=i) for i in seeds],
    )
    assert all(r.text in choices and r.finish_reason == "stop" for r in out)
    pattern = r"[0-9]{2,4}-[а-я]{1,6}"
    out = service.generate_batch(
        [PROMPTS[i % 4] for i in seeds],
        [constrained(Constraint.regex(pattern), seed=i) for i in seeds],
    )
    assert all(re.fullmatch(pattern, r.text) and r.finish_reason == "stop" for r in out), out


def test_min_new_tokens_and_ignore_eos_never_force_past_a_complete_grammar(service):
    p = constrained(Constraint.choice(["да"]), min_new_tokens=30, ignore_eos=True)
    (r,) = service.generate_batch(["Привет"], [p])
    assert (r.text, r.finish_reason, r.completion_tokens) == ("да", "stop", len(r.token_ids))


def test_the_token_budget_ends_a_row_with_a_prefix(service):
    p = constrained(Constraint.regex(r"[0-9]{40}"), max_new_tokens=5)
    (r,) = service.generate_batch(["Число:"], [p])
    assert r.finish_reason == "length" and r.completion_tokens == 5
    assert re.fullmatch(r"[0-9]+", r.text) and len(r.text) < 40


def test_seeded_constrained_rows_are_reproducible(service):
    p = constrained(Constraint.json_schema(PERSON), seed=11, max_new_tokens=200)
    first = service.generate_batch(PROMPTS[:2], [p, p])
    assert first == service.generate_batch(PROMPTS[:2], [p, p])


def test_constrained_and_free_rows_share_a_batch_unchanged(service):
    """Each row's text in a mixed batch equals its text alone (greedy and seeded)."""
    rows = [
        (PROMPTS[0], constrained(None, temperature=0, max_new_tokens=30)),
        (PROMPTS[1], constrained(Constraint.json_schema(PERSON), seed=3, max_new_tokens=200)),
        (PROMPTS[2], constrained(None, seed=5, max_new_tokens=30)),
        (PROMPTS[3], constrained(Constraint.choice(["да", "нет"]), temperature=0)),
        (PROMPTS[0], constrained(Constraint.regex(r"[a-z]{3,9}"), seed=9)),
    ]
    together = service.generate_batch([t for t, _ in rows], [p for _, p in rows])
    alone = [service.generate_batch([t], [p])[0] for t, p in rows]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]


def test_logprobs_stay_those_of_the_raw_logits(service):
    """The first token's alternatives are the model's, unmasked: the same as a free row's."""
    free = constrained(None, temperature=0, max_new_tokens=1, logprobs=5, min_new_tokens=0)
    bound = constrained(Constraint.choice(["нет"]), temperature=0, logprobs=5)
    (a,) = service.generate_batch(["Привет"], [free])
    (b,) = service.generate_batch(["Привет"], [bound])
    assert b.text == "нет"
    assert [t for t, _ in b.logprobs[0].top] == [t for t, _ in a.logprobs[0].top]
    assert [v for _, v in b.logprobs[0].top] == pytest.approx([v for _, v in a.logprobs[0].top])
