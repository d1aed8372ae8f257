"""OpenAPI entries for the infer routes, which the raw-ASGI data plane serves, not FastAPI."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from gateway.openapi_errors import document_errors

_INFER_DOC = {
    "tags": ["inference"],
    "summary": "Infer (Open Inference Protocol v2, JSON or binary tensor extension)",
    "description": (
        "Forwarded unchanged to an edge serving the model (version). With the binary tensor "
        "extension send `Inference-Header-Content-Length: <JSON header bytes>` and the raw "
        "tensors after the JSON header. Unversioned requests follow the model's traffic split. "
        "Response headers `x-fedgate-edge` and `x-fedgate-model-version` name who served it; "
        "`x-fedgate-feedback-token` (when the gateway has a feedback secret) goes back with "
        "`POST /v1/feedback` for this request, to send the label to that edge alone. "
        "Needs `Authorization: Bearer <key>` (role infer or admin)."
    ),
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {"description": "Inference response (JSON, or JSON header plus binary tensors)"},
        "400": {"description": 'Bad request: `{"error": "..."}` names the input and problem'},
        "401": {"description": "Missing or unknown API key"},
        "404": {"description": "Unknown model or version"},
        "413": {"description": "Body over the size limit"},
        "429": {"description": "Rate limit of the key exceeded; see `Retry-After`"},
        "503": {"description": "No edge can serve the model now"},
    },
}


def document_infer(api: FastAPI) -> None:
    """Add ``POST /v2/models/{model}[/versions/{version}]/infer`` to ``api``'s OpenAPI."""
    plain = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is not None:
            return api.openapi_schema
        schema = plain()
        params = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
        version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
        paths = schema.setdefault("paths", {})
        paths["/v2/models/{model}/infer"] = {"post": {**_INFER_DOC, "parameters": params}}
        paths["/v2/models/{model}/versions/{version}/infer"] = {
            "post": {**_INFER_DOC, "parameters": [*params, version]}
        }
        document_errors(schema, api.routes)
        api.openapi_schema = schema
        return schema

    api.openapi = openapi  # type: ignore[method-assign]
