"""Schemathesis hooks (loaded through SCHEMATHESIS_HOOKS by tests/system/test_fuzz.py): besides the
cases it draws from our schema, send JSON bodies whose fields are nested hundreds of levels deep or
whose texts carry lone surrogates. Both once passed JSON parsing and schema validation and reached a
500 (a RecursionError in the JSON decoder, a TypeError in the tokenizer); schemathesis does not draw
them by itself. (Forms cannot carry either: UTF-8 has no surrogates, and a form field no
nesting.) And objects keyed by integers (`logit_bias`: token id -> bias) keyed by other Unicode
digits: superscripts and circled ones pass `str.isdigit()` but not `int()`, Arabic-Indic and
fullwidth ones pass both, and `int()` reads no more than 4,300 digits (a 500 once, issue 32)."""

from __future__ import annotations

import schemathesis
from hypothesis import strategies as st

SURROGATES = ["\ud800", "a\udfffb", "\udc00\udc00", "Привет \ud83d"]
INTEGER_KEYED = ("logit_bias",)
# superscript, circled, Arabic-Indic, fullwidth, mixed with ASCII, and one digit too many for int()
DIGIT_KEYS = ["²", "¹²", "①", "⑫", "٣", "۱۲", "３", "１２", "1²", "5①", "1" * 4301]


def _nested(value, depth: int):
    for _ in range(depth):
        value = [value]
    return value


def _texts(body: dict) -> list[str]:
    """The fields that hold text: a string, or a list of strings."""
    return sorted(
        k
        for k, v in body.items()
        if isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v))
    )


def _least_valid(body: dict) -> dict | None:
    """The least valid body of /v1's completions or chat (which have `logit_bias`), so that
    nothing else refuses the request before its integer keys are read; None for other routes."""
    if "prompt" in body:
        return {"prompt": "а", "max_tokens": 1}
    if "messages" in body:
        return {"messages": [{"role": "user", "content": "а"}], "max_tokens": 1}
    return None


def _set(case, body: dict):
    case.body = body  # the case was drawn for this example only
    return case


@schemathesis.hook
def flatmap_case(ctx, case):
    body = case.body
    if case.media_type != "application/json" or not isinstance(body, dict) or not body:
        return st.just(case)
    variants = [
        st.just(case),
        # deeper than the service allows (32), shallow enough for the client's own encoder
        st.builds(
            lambda k, d: _set(case, {**body, k: _nested(body[k], d)}),
            st.sampled_from(sorted(body)),
            st.integers(33, 600),
        ),
    ]
    if texts := _texts(body):
        # the text field alone (so nothing else makes the request invalid first), with a surrogate
        variants.append(
            st.builds(
                lambda k, s: _set(case, {k: s if isinstance(body[k], str) else [s]}),
                st.sampled_from(texts),
                st.sampled_from(SURROGATES),
            )
        )
    if (least := _least_valid(body)) is not None:
        variants.append(
            st.builds(
                lambda k, d: _set(case, {**least, k: {d: 1.0}}),
                st.sampled_from(INTEGER_KEYED),
                st.sampled_from(DIGIT_KEYS),
            )
        )
    return st.one_of(variants)
