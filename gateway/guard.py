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

Elements are counted, not decoded: their values are Triton's business (a bad one is an
ordinary 400 from the edge, which :mod:`gateway.validate` explains). The check costs one
``json.loads`` of the request's JSON and a few comparisons per input.

Repeated framing headers are refused before any body is read (:func:`repeated_header`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fedcore.strict_json import RepeatedKey, strict_decoder
from gateway.schemas import ModelSchema, TensorSchema
from gateway.validate import (
    DTYPE_SIZES,
    flatten,
    outputs_problems,
    request_problems,
)

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
SHARED_MEMORY = "shared memory is not available through the gateway: send 'data' or binary data"


# Element values are never looked at, only counted: a float becomes its length (a small
# cached int, no float object made).
_DECODER = strict_decoder(parse_float=len)


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
    A binary request's verdict depends only on its JSON header, the payload's length and
    the schema, and clients repeat the same header: small headers' verdicts are kept.
    """
    if header_length is None or header_length > _CACHED_HEADER:
        return _check(body, header_length, schema)
    key = (schema.name, schema.version, body[:header_length], len(body) - header_length)
    if key in _VERDICTS:
        return _VERDICTS[key]
    if len(_VERDICTS) >= _CACHED_VERDICTS:
        _VERDICTS.clear()
    verdict = _VERDICTS[key] = _check(body, header_length, schema)
    return verdict


_CACHED_HEADER = 2048
_CACHED_VERDICTS = 1024
_VERDICTS: dict[tuple[str, int, bytes, int], str | None] = {}


def _check(body: bytes, header_length: int | None, schema: ModelSchema) -> str | None:
    header = body if header_length is None else body[:header_length]
    where = ""
    if header_length is not None:
        where = f" in the first {header_length} bytes (Inference-Header-Content-Length)"
    try:
        doc = _DECODER.decode(header.decode())  # UTF-8 only, as Triton reads it
    except RepeatedKey as exc:
        return f"request JSON repeats the key {exc.key!r} in one object"
    except RecursionError:
        return f"malformed request JSON{where}: nested too deeply"
    except (ValueError, UnicodeDecodeError) as exc:
        return f"malformed request JSON{where}: {exc}"
    if _fits(doc, schema, len(body), len(body) - len(header)):
        return None  # the usual case, checked in one straight pass
    return problem_of(doc, schema, len(body), len(body) - len(header))


def problem_of(doc: Any, schema: ModelSchema, limit: int, payload: int) -> str | None:
    """The first problem of a parsed request (``limit``: the body's size, ``payload``: the
    bytes after its JSON header), in order; None if there is none."""
    if not isinstance(doc, dict):
        return "the request must be a JSON object with an 'inputs' list"
    problem = next(request_problems(doc), None)
    if problem is None:
        problem = _inputs_problem(doc.get("inputs"), schema, limit, payload)
    if problem is None:
        problem = _outputs_problem(doc.get("outputs"), schema)
    return problem


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


def _inputs_problem(inputs: Any, schema: ModelSchema, limit: int, payload: int) -> str | None:
    return next(_inputs_problems(inputs, schema, limit, payload), None)


def _inputs_problems(inputs: Any, schema: ModelSchema, limit: int, payload: int) -> Iterator[str]:
    """Problems in order; only the first is taken, so later checks see a sound request."""
    if not isinstance(inputs, list) or not inputs:
        yield "'inputs' must be a non-empty list of tensors"
    known = {t.name: t for t in schema.inputs}
    seen: set[str] = set()
    binary_total = 0
    for index, item in enumerate(inputs):
        if not isinstance(item, dict):
            yield f"inputs[{index}] must be an object"
        name = item.get("name")
        if not isinstance(name, str) or name not in known:
            expected = ", ".join(repr(n) for n in known)
            yield f"unknown input {name!r} for model '{schema.name}' (it takes {expected})"
        if name in seen:
            yield f"input '{name}' is given twice"
        seen.add(name)
        for problem in _tensor_problems(item, known[name], schema.max_batch_size, limit):
            yield f"input '{name}': {problem}"
        binary_total += item.get("parameters", {}).get("binary_data_size", 0)
    missing = [n for n in known if n not in seen]
    if missing:
        yield f"missing input '{missing[0]}' for model '{schema.name}'"
    if binary_total != payload:
        yield (
            f"binary tensor data is {payload} bytes after the JSON header, but the inputs' "
            f"binary_data_size add up to {binary_total}"
        )


def _tensor_problems(
    item: dict[str, Any], spec: TensorSchema, max_batch: int, limit: int
) -> Iterator[str]:
    datatype = item.get("datatype")
    if not isinstance(datatype, str) or datatype not in DTYPE_SIZES:
        yield f"unknown datatype {datatype!r}"
    if datatype != spec.datatype:
        yield f"datatype {datatype} does not match the model's {spec.datatype}"
    shape: Any = item.get("shape")
    yield from _shape_problems(shape, spec, max_batch, limit)
    count = 1
    for dim in shape:
        count = min(count * dim, limit + 1)  # saturates: a larger count fits nothing anyway
    params = item.get("parameters", {})
    if not isinstance(params, dict):
        yield "'parameters' must be an object"
    if "shared_memory_region" in params:
        yield SHARED_MEMORY
    size = params.get("binary_data_size")
    if size is None and "data" not in item:
        yield "no 'data' and no parameters.binary_data_size"
    if size is None:
        elements = flatten(item["data"])
        if elements is None:
            yield f"'data' must be a list, got {type(item['data']).__name__}"
        elif len(elements) != count:
            yield f"'data' has {len(elements)} elements, but shape {shape} needs {count}"
        return
    if "data" in item:
        yield "give either 'data' or parameters.binary_data_size, not both"
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        yield f"binary_data_size must be a non-negative integer, got {size!r}"
    element = DTYPE_SIZES.get(spec.datatype)
    need = count * (element or 4)  # a BYTES element is at least its 4-byte length
    if (element is not None and size != need) or size < need:
        yield f"binary_data_size is {size} bytes, but shape {shape} of {datatype} needs {need}"


def _shape_problems(shape: Any, spec: TensorSchema, max_batch: int, limit: int) -> Iterator[str]:
    """Rank, fixed dimensions, no dimension beyond ``limit`` (the body's size), batch."""
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        yield f"'shape' must be a list of non-negative integers, got {shape!r}"
    model = list(spec.shape)
    if len(shape) != len(model):
        yield f"shape {shape} does not match the model's {model} (-1: any): rank {len(shape)}"
    for position, (want, got) in enumerate(zip(model, shape, strict=True)):
        if want not in (-1, got):
            yield f"shape {shape} does not match the model's {model} (-1: any) at {position}"
        if got > limit:
            yield f"shape {shape}: dimension {position} is larger than the {limit}-byte body"
    if max_batch > 0 and shape[0] > max_batch:
        yield f"shape {shape}: batch-size must be <= {max_batch} (the model's max_batch_size)"


def _outputs_problem(outputs: Any, schema: ModelSchema) -> str | None:
    problem = next(outputs_problems(outputs, schema), None)
    if problem is not None or outputs is None:
        return problem
    for item in outputs:
        if "shared_memory_region" in item.get("parameters", {}):
            return f"output '{item['name']}': {SHARED_MEMORY}"
    return None
