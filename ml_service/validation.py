"""Pydantic's validation errors in our words: the one wording of a bad field, shared by the model
contract (a /forward_batch item, `ModelService.split_batch`) and the HTTP layer (any request body,
`backend/errors.py`). A leaf: it imports nothing of ml_service, so both can sit above it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

# the names pydantic gives the members of a union in an error's `loc` without brackets
_UNION_TAGS = {"str", "int", "float", "bool", "bytes", "dict", "list", "tuple", "set", "none"}
# what a number or boolean field must be, when a value of another JSON type was sent (the request
# models are strict: "5" is no integer, 5.0 no integer either, 1 no boolean, true no number)
_TYPE_WANTED = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
}


def _json_kind(value) -> str:
    """What a JSON value is, in a few words (never a value that could be large)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):  # for a number field: one too large for a float
        return "an integer this large" if abs(value) > 2**1023 else "an integer"
    if isinstance(value, float):
        return f"{value!r}"
    kinds = {str: "a string", type(None): "null", list: "an array", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def pydantic_errors(exc: ValidationError | RequestValidationError) -> list[dict]:
    """Readable, JSON-safe errors: where and what, without echoing large inputs back. `loc` is
    the field's path in the body: pydantic's tags for union members (`function-after[...]`,
    `list[TextPart]`, `str`) are left out, and a member that did not even match the input's type
    (`Input should be a valid string` for a list) is left out where another member says more."""

    def is_tag(x) -> bool:
        return isinstance(x, str) and (
            x in _UNION_TAGS or "[" in x or "(" in x or x.startswith("constrained-")
        )

    found = []
    for e in exc.errors():
        raw = [x for x in e.get("loc", ()) if x != "body"]
        kind = e.get("type", "value_error")
        # a union member whose type the input does not have: its error is at the member's tag
        wrong_member = bool(raw) and is_tag(raw[-1]) and kind.endswith("_type")
        msg = e.get("msg", "invalid value").removeprefix("Value error, ")  # pydantic's prefix
        if kind in _TYPE_WANTED and not wrong_member and "input" in e:  # "5" for an integer
            msg = f"{_TYPE_WANTED[kind]}, not {_json_kind(e['input'])}"
        loc = [str(x) for x in raw if not is_tag(x)]
        found.append((loc, msg, kind, wrong_member))
    out, unmatched = [], {}  # unmatched: loc -> the error listing the members that did not match
    for loc, msg, kind, wrong_member in found:
        if wrong_member and any(o[: len(loc)] == loc and not w for o, _, _, w in found):
            continue  # another member of this union matched the input and says what is wrong
        if wrong_member and tuple(loc) in unmatched:  # no member matched: one error lists them
            unmatched[tuple(loc)]["msg"] += " or " + msg.removeprefix("Input should be ")
            continue
        error = {"loc": loc, "msg": msg, "type": kind}
        if wrong_member:
            unmatched[tuple(loc)] = error
        out.append(error)
    return out
