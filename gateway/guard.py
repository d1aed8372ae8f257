"""The pre-forward check: every inference request against its model's schema, before an edge.

Triton trusts the shapes it is sent: one request with ``"shape": [2147483648, 64]`` and a
single element made an edge's tritonserver abort (issue #16). So the gateway checks each
request's structure against the model's tensors (:class:`gateway.schemas.ModelSchema`,
from Triton's metadata and configuration, fetched once per version) before forwarding it:

- the JSON (or the binary request's JSON header) parses, with no key repeated in one
  object (Python keeps the last copy, Triton's parser the first);
- every input is a model input, once; datatype equal to the model's; rank equal, fixed
  dimensions equal (``-1``: any), no dimension larger than the body could hold (so the
  element count, computed with saturation, never overflows), the batch dimension within
  ``max_batch_size``;
- element count (product of the shape) equal to the length of ``data``, or
  ``binary_data_size`` equal to count times element size; binary sizes adding up to the
  bytes after the JSON header; no ``shared_memory_region`` (the edge's own memory, never a
  gateway client's);
- outputs named by the model, with well-typed parameters.

A request that fits goes through in one straight pass (:func:`_fits`); any other gets
the checks that say what is wrong (:func:`gateway.validate.problem_of`, the one
implementation, which the explainer of an edge's refusal runs too). Elements are counted,
not decoded: their values are Triton's business (a bad one is an ordinary 400 from the
edge, which :func:`gateway.validate.explain` explains). The check costs one ``json.loads``
of the request's JSON and a few comparisons per input.

Repeated framing headers are refused before any body is read (:func:`repeated_header`).
"""

from __future__ import annotations

from typing import Any

from fedcore.strict_json import strict_decoder
from gateway.schemas import ModelSchema, TensorSchema
from gateway.validate import DTYPE_SIZES, flatten, parse_request, problem_of

SINGLE_HEADERS = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"content-encoding",
        b"inference-header-content-length",
        b"content-type",
        b"accept-encoding",
        b"authorization",
    }
)
"""Headers an inference request may carry at most once (lowercase names)."""


# Element values are never looked at, only counted: a float becomes its length (a small
# cached int, no float object made).
_DECODER = strict_decoder(parse_float=len)
# A request the straight pass does not take is parsed again with its floats, so that a
# message quoting a value (a float binary_data_size, say) quotes what the client sent.
_FULL_DECODER = strict_decoder()


def repeated_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The first of :data:`SINGLE_HEADERS` that ``headers`` carries twice, or None."""
    seen: set[bytes] = set()
    for name, _ in headers:
        if name in SINGLE_HEADERS:
            if name in seen:
                return name.decode("latin-1").title()
            seen.add(name)
    return None


def check_request(body: bytes, header_length: int | None, schema: ModelSchema) -> str | None:
    """What is wrong with inference request ``body`` for ``schema``; None if it may go on.

    ``body`` is decoded (no ``Content-Encoding``); ``header_length`` is its binary
    extension's ``Inference-Header-Content-Length``, already checked against the body.
    What is wrong with a binary request depends only on its JSON header, the payload's length and
    the schema, and clients repeat the same header: small headers' answers are kept.
    """
    if header_length is None or header_length > _CACHED_HEADER:
        return _check(body, header_length, schema)
    key = (schema.name, schema.version, body[:header_length], len(body) - header_length)
    if key in _CHECKED:
        return _CHECKED[key]
    if len(_CHECKED) >= _CACHED_CHECKS:
        _CHECKED.clear()
    problem = _CHECKED[key] = _check(body, header_length, schema)
    return problem


_CACHED_HEADER = 2048
_CACHED_CHECKS = 1024
_CHECKED: dict[tuple[str, int, bytes, int], str | None] = {}


def _check(body: bytes, header_length: int | None, schema: ModelSchema) -> str | None:
    header = body if header_length is None else body[:header_length]
    doc, malformed = parse_request(header, header_length, _DECODER)
    if malformed:
        return malformed
    payload = len(body) - len(header)
    if _fits(doc, schema, len(body), payload):
        return None  # the usual case, checked in one straight pass
    doc, _ = parse_request(header, header_length, _FULL_DECODER)
    return problem_of(doc, schema, len(body), payload)


def _fits(doc: Any, schema: ModelSchema, limit: int, payload: int) -> bool:
    """True only for a request that every check below would pass (inputs in the model's
    order, outputs plain): the hot path. Anything else goes to the checks that say what
    is wrong (which may still find nothing)."""
    if type(doc) is not dict or type(doc.get("id", "")) is not str:
        return False
    params = doc.get("parameters", {})
    if type(params) is not dict or type(params.get("binary_data_output", False)) is not bool:
        return False
    inputs = doc.get("inputs")
    if type(inputs) is not list or len(inputs) != len(schema.inputs):
        return False
    binary = 0
    for item, spec in zip(inputs, schema.inputs, strict=True):
        size = _fitting_tensor(item, spec, schema.max_batch_size, limit)
        if size is None:
            return False
        binary += size
    return binary == payload and _fitting_outputs(doc.get("outputs", []), schema)


def _fitting_tensor(item: Any, spec: TensorSchema, max_batch: int, limit: int) -> int | None:
    """The tensor's binary size (0 for JSON data) if it fits ``spec``, else None."""
    if type(item) is not dict or item.get("name") != spec.name:
        return None
    count = _fitting_count(item.get("shape"), spec, max_batch, limit)
    if count is None or item.get("datatype") != spec.datatype:
        return None
    if "parameters" not in item:
        data = item.get("data")
        elements = flatten(data) if type(data) is list else None
        return 0 if elements is not None and len(elements) == count else None
    params = item["parameters"]
    element = DTYPE_SIZES.get(spec.datatype)
    if type(params) is not dict or "data" in item or "shared_memory_region" in params:
        return None
    size = params.get("binary_data_size")
    return size if type(size) is int and element and size == count * element else None


def _fitting_count(shape: Any, spec: TensorSchema, max_batch: int, limit: int) -> int | None:
    """The element count of ``shape`` if it fits ``spec`` (no dim beyond ``limit``)."""
    if type(shape) is not list or len(shape) != len(spec.shape):
        return None
    count = 1
    for want, got in zip(spec.shape, shape, strict=True):
        if type(got) is not int or not 0 <= got <= limit or want not in (-1, got):
            return None
        count *= got
    return None if max_batch and shape and shape[0] > max_batch else count


def _fitting_outputs(outputs: Any, schema: ModelSchema) -> bool:
    if type(outputs) is not list:
        return False
    for item in outputs:
        name = item.get("name") if type(item) is dict else None
        if type(name) is not str or name not in schema.output_names:
            return False
        params = item.get("parameters", {})
        if type(params) is not dict or "shared_memory_region" in params:
            return False
        if type(params.get("binary_data", False)) is not bool:
            return False
    return True
