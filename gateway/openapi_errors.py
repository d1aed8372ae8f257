"""The error answers of every route in ``/openapi.json``, as the gateway really gives them.

FastAPI documents a 422 validation error in its own shape for every route with parameters;
the gateway answers those with 400 and ``{"error": "..."}`` (see ``app._error_handlers``),
and every other refusal (401, 403, 404, 409, 413, 429, 503) in the same shape. This
derives each route's list from what it depends on: its key (infer or admin), its path
parameters, its body; ``tests/test_hostile_gateway.py`` checks the result against the live
gateway with schemathesis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what is wrong, and where"}},
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_MEANING = {
    "400": "Bad request: the message names the parameter or field",
    "401": "Missing or unknown API key (`Authorization: Bearer <key>`)",
    "403": "The key's role is not allowed here (needs `admin`)",
    "404": "Unknown model, version or rollout",
    "409": "Conflicts with the rollout in progress or with its state",
    "413": "Body over the size limit",
    "429": "Rate limit of the key exceeded; see `Retry-After`",
    "502": "The edge failed to answer",
    "503": "No edge, or the message bus, can serve this now",
    "504": "The edge did not answer in time",
}
TEXT = {"/metrics": "text/plain"}
"""Routes whose 200 is not JSON (Prometheus' text exposition format)."""
NO_CONTENT = {
    "/v2/health/live": ("200",),
    "/v2/health/ready": ("200", "400"),
    "/v1/health/ready": ("200", "503"),
}
"""Health answers are status codes with empty bodies (the Open Inference Protocol's)."""


def _api_routes(routes: Iterable[Any]) -> Iterator[tuple[str, APIRoute]]:
    """(path, route) of every FastAPI route, included routers' too."""
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI includes routers lazily
    except ImportError:  # older FastAPI: the app's routes are the routes
        yield from ((r.path_format, r) for r in routes if isinstance(r, APIRoute))
        return
    for context in iter_route_contexts(list(routes)):
        route = context.original_route
        if isinstance(route, APIRoute):
            yield context.path_format or route.path_format, route


def _calls(dependant: Dependant) -> Iterable[Callable[..., Any]]:
    for dep in dependant.dependencies:
        if dep.call is not None:
            yield dep.call
        yield from _calls(dep)


def route_errors(
    path: str, has_body: bool, calls: set[str], declared: Iterable[str]
) -> dict[str, str]:
    """Status -> meaning of the errors a route can answer (besides ``declared`` ones)."""
    codes = {"400"}
    if {"_infer_key", "_admin_key"} & calls:
        codes |= {"401", "429"}
    if "_admin_key" in calls:
        codes.add("403")
    if "{model}" in path:
        codes |= {"404", "503"}
    if "/rollouts" in path:
        codes |= {"404", "409", "503"}
    if path == "/v1/feedback":
        codes |= {"503"}
    if has_body:
        codes.add("413")
    if path.endswith("/infer"):
        codes |= {"502", "504"}  # the edge failed or timed out (not retried: not idempotent)
    return {c: _MEANING[c] for c in sorted(codes) if c not in declared}


def document_errors(schema: dict[str, Any], routes: Iterable[Any]) -> None:
    """Rewrite ``schema``'s responses in place (the infer paths are documented already)."""
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    components.setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key with role infer or admin: `Authorization: Bearer <key>`",
    }
    schemas = components["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    deps = {
        (path, method.lower()): {getattr(c, "__name__", "") for c in _calls(route.dependant)}
        for path, route in _api_routes(routes)
        for method in route.methods or ()
    }
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            responses: dict[str, Any] = op.setdefault("responses", {})
            if path in NO_CONTENT:
                op["responses"] = {c: {"description": _health(c)} for c in NO_CONTENT[path]}
                continue
            if path.endswith("/ready"):  # OIP: the status is the answer, the body empty
                responses["200"] = {"description": "true"}
                responses["400"] = {"description": "false (not ready, or no such version)"}
            if responses.get("422", {}).get("description") == "Validation Error":
                del responses["422"]  # FastAPI's shape; the gateway answers these with 400
            if path in TEXT:
                ok = responses.setdefault("200", {"description": "OK"})
                ok["content"] = {TEXT[path]: {"schema": {"type": "string"}}}
            calls = deps.get((path, method), set())
            if {"_infer_key", "_admin_key"} & calls or path.endswith("/infer"):
                op["security"] = [{"apiKey": []}]
                calls = calls | {"_infer_key"}
            added = route_errors(path, "requestBody" in op, calls, responses)
            for code, meaning in added.items():
                responses[code] = {"description": meaning}
            for code, response in responses.items():
                if code[0] in "45" and not (path.endswith("/ready") and code == "400"):
                    response["content"] = {"application/json": {"schema": _ERROR_REF}}


def _health(code: str) -> str:
    return "true" if code == "200" else "false"
