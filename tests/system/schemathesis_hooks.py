"""Schemathesis hooks (loaded through SCHEMATHESIS_HOOKS by tests/system/test_fuzz.py): besides the
cases it draws from our schema, send JSON bodies whose fields are nested hundreds of levels deep or
whose texts carry lone surrogates. Both once passed JSON parsing and schema validation and reached a
500 (a RecursionError in the JSON decoder, a TypeError in the tokenizer); schemathesis does not draw
them by itself. (Forms cannot carry either: UTF-8 has no surrogates, and a form field no
nesting.) And objects keyed by integers (`logit_bias`: token id -> bias) keyed by other Unicode
digits: superscripts and circled ones pass `str.isdigit()` but not `int()`, Arabic-Indic and
fullwidth ones pass both, and `int()` reads no more than 4,300 digits (a 500 once, issue 32).

And a number or boolean field of the wrong type: as JSON, its value as a string, a boolean, a float
for an integer or an integer for a boolean (`"5"`, `true`, `5.0`, `1`; a weight or bias `true`); in
a form, text that is not its type's (`3.0`, `٣` or ` 3` for an integer, `1,5` for a number, `yes`
for a boolean). Each once answered 200 (issue 32, item 5); the check `wrong_type_is_a_400`, which
tests/system/test_fuzz.py runs, requires a 400 (the case carries the field's name in a header)."""

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


# JSON values and form texts that a field of each kind must refuse
WRONG_JSON = {
    "integer": ["5", 5.0, True],  # (null is an optional integer's: seed)
    "number": ["0.5", True, [0.5]],
    "boolean": ["true", 1, 0, "yes"],
    "weights": [True, "90", None],  # one value of an object of numbers (logit_bias, split)
}
WRONG_TEXT = {
    "integer": ["3.0", "٣", " 3", "+3", ""],
    "number": ["1,5", "nan", "inf", ".5"],
    "boolean": ["yes", "True", "1", ""],
}
WRONG_TYPE = "x-fuzz-wrong-type"  # the header naming the field a case sent with a wrong type


def _kind(prop: dict) -> str | None:
    """A body property's kind, from its schema (an optional one is `anyOf` with null): integer,
    number, boolean, `weights` (an object of numbers) or None (another)."""
    kinds = set()
    for option in prop.get("anyOf", [prop]):
        values = option.get("additionalProperties")
        if option.get("type") == "object" and isinstance(values, dict):
            if values.get("type") in ("number", "integer"):
                kinds.add("weights")
        elif option.get("type") in ("integer", "number", "boolean"):
            kinds.add(option["type"])
    return kinds.pop() if len(kinds) == 1 else None


def _typed_fields(case) -> dict[str, str]:
    """The body's number, boolean and weights fields, by name, from the operation's schema."""
    body = case.operation.get_body_for_media_type(case.media_type)
    schema = (body.resolved_schema if body is not None else None) or {}
    kinds = {name: _kind(prop) for name, prop in schema.get("properties", {}).items()}
    return {name: kind for name, kind in kinds.items() if kind is not None}


def _wrong(case, body: dict, field: str, value):
    case.headers = {**(case.headers or {}), WRONG_TYPE: field}
    case.body = {**body, field: value}
    return case


def _wrong_types(case, body: dict) -> list:
    """Variants of `case` with one typed field of a wrong type (JSON) or text (a form)."""
    fields = _typed_fields(case)
    if case.media_type == "application/json":
        wrong = WRONG_JSON
    else:
        wrong = WRONG_TEXT
        fields = {k: v for k, v in fields.items() if v in wrong}  # forms carry no objects
    if not fields:
        return []

    def value(field: str, i: int):
        kind = fields[field]
        choice = wrong[kind][i % len(wrong[kind])]
        if kind == "weights":  # one value of the object: a token id or a version name as key
            keys = list(body.get(field) or {}) if isinstance(body.get(field), dict) else []
            return {(keys[0] if keys else "50"): choice}
        return choice

    return [
        st.builds(
            lambda k, i: _wrong(case, body, k, value(k, i)),
            st.sampled_from(sorted(fields)),
            st.integers(0, 4),
        )
    ]


@schemathesis.check
def wrong_type_is_a_400(ctx, response, case):
    """A case sent with a field of the wrong type (`_wrong_types`) is answered 400."""
    field = (case.headers or {}).get(WRONG_TYPE)
    if field is not None and response.status_code != 400:
        raise AssertionError(
            f"{field!r} of the wrong type ({case.body.get(field)!r}) answered "
            f"{response.status_code}, not 400"
        )


def _set(case, body: dict):
    case.body = body  # the case was drawn for this example only
    return case


@schemathesis.hook
def flatmap_case(ctx, case):
    body = case.body
    if case.media_type == "multipart/form-data" and isinstance(body, dict):
        return st.one_of([st.just(case), *_wrong_types(case, body)])
    if case.media_type != "application/json" or not isinstance(body, dict) or not body:
        return st.just(case)
    variants = [
        *_wrong_types(case, body),
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
