"""The OpenAPI request bodies of the routes that read their body themselves (`bodies.py`): FastAPI
cannot see those, so each route states its body here, from the same pydantic models it validates
with, and the document (and the fuzzers reading it) describes what the route takes."""

from __future__ import annotations

from pydantic import BaseModel

from ml_service.backend.bodies import array_fields
from ml_service.contract import BatchRequest, ModelService


def with_stream(responses: dict) -> dict:
    """The 200 answer may also be an event stream (documented for clients and for fuzzers)."""
    return {
        **responses,
        200: {
            "description": "the response (JSON), or with `stream` a `text/event-stream`",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    }


def inline_refs(schema: dict) -> dict:
    """The model's JSON schema with its `$defs` written in place: a schema put into the OpenAPI
    document by hand cannot point at `#/$defs/...` (ReDoc and schemathesis resolve references from
    the document's root). The request models are not recursive."""
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(
                    {
                        **defs[ref.removeprefix("#/$defs/")],
                        **{k: v for k, v in node.items() if k != "$ref"},
                    }
                )
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def json_body(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that reads its JSON itself."""
    schema = inline_refs(model.model_json_schema())
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def batch_body(service_cls: type[ModelService]) -> dict:
    """The /forward_batch body. The default one (`BatchRequest`) takes its items as plain objects
    and validates each as a single request, so that an error names its item (`["items", 3,
    "text"]`); the document describes each item as that request."""
    body = json_body(service_cls.batch_request_model)
    if service_cls.batch_request_model is BatchRequest:
        schema = body["requestBody"]["content"]["application/json"]["schema"]
        item = inline_refs(service_cls.request_model.model_json_schema())
        schema["properties"]["items"]["items"] = item
    return body


def forward_body(model: type[BaseModel], takes_text: bool) -> dict:
    """The /forward body: the request as JSON, or the same fields as a form (a list field as a
    repeated one; with a `text` field, a UTF-8 `file` may replace it)."""
    schema = inline_refs(model.model_json_schema())
    form_props = {
        k: ({"type": "array", "items": {"type": "string"}} if k in array_fields(model) else v)
        for k, v in schema.get("properties", {}).items()
    }
    if takes_text:
        form_props["file"] = {
            "type": "string",
            "format": "binary",
            "description": "UTF-8 text file instead of `text`",
        }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {"schema": {"type": "object", "properties": form_props}},
            },
        }
    }
