"""Request bodies, read at the edge: a JSON object (its nesting bounded before it is parsed), or a
multipart/url-encoded form (parsed here, byte-exact; each field read from its text as strictly as
JSON's types are: `form_value`), then validated into the route's model, in pydantic's strict mode.
Any body that is not right becomes BadRequest, in our words, before the model is touched."""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import unquote_to_bytes

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError

try:  # python-multipart's import name since 0.0.13; before, `multipart`
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ModuleNotFoundError:  # pragma: no cover
    from multipart.exceptions import FormParserError
    from multipart.multipart import MultipartParser, parse_options_header

from ml_service.backend.errors import BadRequest
from ml_service.settings import Settings
from ml_service.validation import pydantic_errors

log = logging.getLogger("ml_service")


def validated(model: type[BaseModel], payload: dict) -> BaseModel:
    """`payload` as `model`, strictly (a plugin's model too: `"5"` is no integer, `1` no boolean,
    `true` no number), or BadRequest naming each bad field. A model that ignores unknown fields
    (the OpenAI requests, so that newer clients keep working) notes them at debug level."""
    if model.model_config.get("extra", "ignore") == "ignore":
        if unknown := sorted(set(payload) - set(model.model_fields)):
            log.debug("%s: ignoring unknown fields %s", model.__name__, unknown)
    try:
        return model.model_validate(payload, strict=True)
    except ValidationError as e:
        raise BadRequest(pydantic_errors(e)) from None


def content_type(request: Request) -> str:
    """The media type alone (lower case, no parameters; empty when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(
    request: Request, settings: Settings, kinds: dict[str, str], takes_text: bool
) -> dict:
    """A dict from a JSON object or a multipart/urlencoded form (its fields read by their
    `form_kinds`), or BadRequest."""
    ct = content_type(request)
    if ct == "application/json":
        return await read_json_object(request)
    if ct in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await read_form(request, settings, kinds, takes_text)
    raise BadRequest.one(
        "content-type",
        f"unsupported content type {ct or '(none)'!r}; send application/json or multipart/form-data",
    )


MAX_JSON_DEPTH = 32  # arrays and objects inside each other; our bodies need 3
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `body` nests arrays/objects more than `limit` deep, decided without parsing it (a
    deep parse would recurse once per level). Brackets inside strings do not count."""
    if body.count(b"[") + body.count(b"{") <= limit:  # every ordinary body: no scan at all
        return False
    structure = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    steps = (structure == ord("[")).astype(np.int32) + (structure == ord("{"))
    steps -= (structure == ord("]")).astype(np.int32) + (structure == ord("}"))
    return bool(steps.cumsum().max(initial=0) > limit)


# what Python's JSON parser reports (its whole, fixed set of messages), in our words
JSON_PROBLEMS = {
    "Expecting value": "a value was expected",
    "Expecting ':' delimiter": "a ':' was expected",
    "Expecting ',' delimiter": "a ',' was expected",
    "Expecting property name enclosed in double quotes": "a key in double quotes was expected",
    "Unterminated string starting at": "a string that is never closed starts here",
    "Invalid control character at": "a control character inside a string must be escaped",
    "Invalid \\escape": "a string has an invalid backslash escape",
    "Invalid \\uXXXX escape": "a string has an invalid \\u escape",
    "Extra data": "more text after the JSON value",
}


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body, or BadRequest that says, in our words, what is wrong."""
    if json_depth_exceeds(body):
        raise BadRequest.one("body", f"malformed JSON: nested more than {MAX_JSON_DEPTH} deep")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest.one("body", f"the body is not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        problem = JSON_PROBLEMS.get(e.msg, "invalid JSON syntax")
        raise BadRequest.one(
            "body", f"malformed JSON at line {e.lineno}, column {e.colno}: {problem}"
        ) from None
    except ValueError:  # the only other one: an integer longer than Python converts (4,300 digits)
        raise BadRequest.one("body", "malformed JSON: a number has too many digits") from None


async def read_json_request(request: Request, route: str) -> dict:
    """A JSON-only route's body (/v1's): `application/json` (another content type, or none, is a
    400 naming `content-type`, as on /forward), holding a JSON object."""
    if (ct := content_type(request)) != "application/json":
        raise BadRequest.one(
            "content-type",
            f"unsupported content type {ct or '(none)'!r}; {route} takes application/json",
        )
    return await read_json_object(request)


async def read_json_object(request: Request) -> dict:
    payload = parse_json(await request.body())
    if not isinstance(payload, dict):
        raise BadRequest.one("body", "the JSON body must be an object")
    return payload


MAX_FORM_FIELDS = 32  # form fields in one request (files not counted: at most one)


def array_fields(model: type[BaseModel]) -> set[str]:
    """Fields that take a list: a repeated form field fills them."""
    return {name for name, kind in form_kinds(model).items() if kind == "array"}


def form_kinds(model: type[BaseModel]) -> dict[str, str]:
    """How a form carries each field of `model`, from its JSON schema: `array` (a field that
    takes a list: a repeated field fills it), `integer`, `number` or `boolean` (read from the
    field's text by `form_value`), `object` (a nested model: its JSON text), or `string` (its
    text as it is; also a field of other or several types)."""
    kinds = {}
    for name, prop in model.model_json_schema().get("properties", {}).items():
        options = prop.get("anyOf", [prop])
        types = {o.get("type") for o in options} - {"null"}
        if types <= {"object", None} and any(
            "$ref" in o or o.get("type") == "object" for o in options
        ):
            kinds[name] = "object"
        elif "array" in types:
            kinds[name] = "array"
        elif len(types) == 1 and (kind := types.pop()) in ("integer", "number", "boolean"):
            kinds[name] = kind
        else:
            kinds[name] = "string"
    return kinds


# a form's text forms of JSON's types: ASCII decimal digits (int() also reads "٣", "1_0" and
# " 1"), a number as JSON writes one, with leading zeros allowed (no "inf", "nan", "0x1", ".5")
_INTEGER_TEXT = re.compile(r"-?[0-9]+")
_NUMBER_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")
MAX_INTEGER_DIGITS = 4300  # what int() reads, as in JSON


def form_value(name: str, text: str, kind: str | None) -> Any:
    """A form field's value from its text: an integer from decimal digits, a number from JSON's
    spelling of one, a boolean from `true` or `false`; anything else is BadRequest naming the
    field; an object from its JSON text. Text fields (and unknown ones, which the model refuses)
    stay text."""
    shown = repr(text[:24]) + ("..." if len(text) > 24 else "")
    if kind == "object":
        try:
            value = parse_json(text.encode("utf-8"))
        except BadRequest as e:
            raise BadRequest.one(
                name, f"{name} must be a JSON object: {e.errors[0]['msg']}"
            ) from None
        if not isinstance(value, dict):
            raise BadRequest.one(name, f"{name} must be a JSON object, not {shown}")
        return value
    if kind == "integer":
        if _INTEGER_TEXT.fullmatch(text) and len(text.lstrip("-")) <= MAX_INTEGER_DIGITS:
            return int(text)
        raise BadRequest.one(name, f"{name} must be an integer (decimal digits), not {shown}")
    if kind == "number":
        if _NUMBER_TEXT.fullmatch(text) and len(text) <= MAX_INTEGER_DIGITS:
            return float(text)
        raise BadRequest.one(name, f"{name} must be a number (such as 0.7 or 1e-3), not {shown}")
    if kind == "boolean":
        if text in ("true", "false"):
            return text == "true"
        raise BadRequest.one(name, f"{name} must be true or false, not {shown}")
    return text


async def read_form(
    request: Request, settings: Settings, kinds: dict[str, str], takes_text: bool
) -> dict:
    """The fields of a multipart or url-encoded form, each read by its kind (`form_kinds`,
    `form_value`). Every field, and an uploaded `file`, must be UTF-8 text: we parse the body
    ourselves, keeping each field's bytes, because Starlette's parser turns bytes that are not
    UTF-8 into other characters (latin-1) without a word."""
    body = await request.body()  # bounded by ML_SERVICE_MAX_BODY_BYTES (413 past it)
    if content_type(request) == "multipart/form-data":
        parts = _multipart_parts(body, request.headers.get("content-type", ""))
    else:
        parts = _urlencoded_parts(body)
    files = [name for name, is_file, _ in parts if is_file]
    if len(files) > 1:
        raise BadRequest.one(files[1], "at most one file may be sent")
    if len(parts) - len(files) > MAX_FORM_FIELDS:
        raise BadRequest.one("body", f"at most {MAX_FORM_FIELDS} form fields may be sent")
    fields: dict[str, list[str]] = {}
    upload: bytes | None = None
    for name, is_file, data in parts:
        if is_file:
            if name != "file" or not takes_text:
                raise BadRequest.one(
                    name,
                    "only the field 'file' may be a file"
                    if takes_text
                    else "files are not accepted",
                )
            upload = data
            continue
        if name == "file" and takes_text:
            raise BadRequest.one("file", "'file' must be an uploaded file")
        try:
            fields.setdefault(name, []).append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadRequest.one(
                name, f"{name!r} is not valid UTF-8 text (byte {e.start} of its value)"
            ) from None
    payload: dict[str, Any] = {
        name: values
        if kinds.get(name) == "array"
        else form_value(name, values[-1], kinds.get(name))
        for name, values in fields.items()
    }
    if upload is not None:
        if "text" in payload:
            raise BadRequest.one("file", "send either 'text' or 'file', not both")
        if len(upload) > settings.max_file_bytes:
            raise BadRequest.one("file", f"file is larger than {settings.max_file_bytes} bytes")
        try:
            payload["text"] = upload.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest.one("file", "file is not valid UTF-8 text") from None
    return payload


def _field_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest.one("body", "a form field's name is not valid UTF-8 text") from None


def _urlencoded_parts(body: bytes) -> list[tuple[str, bool, bytes]]:
    """(name, is a file, value bytes) for each field of an url-encoded form, %-escapes and `+`
    decoded to bytes (not yet to text)."""
    parts = []
    for pair in body.split(b"&"):
        if not pair:
            continue
        if len(parts) > MAX_FORM_FIELDS:  # the count is refused by the caller
            break
        name, _, value = pair.partition(b"=")
        name, value = (unquote_to_bytes(x.replace(b"+", b" ")) for x in (name, value))
        parts.append((_field_name(name), False, value))
    return parts


def _multipart_parts(body: bytes, content_type: str) -> list[tuple[str, bool, bytes]]:
    """(name, is a file, bytes) for each part of a multipart/form-data body, or BadRequest that
    says in our words what is wrong with it."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest.one("content-type", "multipart/form-data needs a boundary parameter")
    parts: list[tuple[str, bool, bytes]] = []
    state: dict[str, Any] = {"ended": False}
    header = [bytearray(), bytearray()]  # the part header being read: name, value

    def part_begin() -> None:
        if len(parts) > MAX_FORM_FIELDS + 1:  # more than any request may send: stop reading
            raise BadRequest.one("body", f"at most {MAX_FORM_FIELDS} form fields may be sent")
        state.update(disposition=None, data=bytearray())

    def header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def header_end() -> None:
        if bytes(header[0]).strip().lower() == b"content-disposition":
            state["disposition"] = bytes(header[1])
        header[0], header[1] = bytearray(), bytearray()

    def part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def part_end() -> None:
        _, options = parse_options_header(state["disposition"] or b"")
        if b"name" not in options:
            raise BadRequest.one("body", "a part of the multipart body has no field name")
        parts.append((_field_name(options[b"name"]), b"filename" in options, bytes(state["data"])))

    def end() -> None:
        state["ended"] = True

    callbacks = {
        "on_part_begin": part_begin,
        "on_header_field": header_field,
        "on_header_value": header_value,
        "on_header_end": header_end,
        "on_part_data": part_data,
        "on_part_end": part_end,
        "on_end": end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError:
        raise BadRequest.one("body", "malformed multipart body") from None
    if not state["ended"]:
        raise BadRequest.one("body", "malformed multipart body: it ends before its last boundary")
    return parts
