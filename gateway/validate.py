"""Checks of inference requests: framing checks, the structural checks, an explainer.

The hot path checks the binary framing header (one integer against the body length) and
the nesting depth. :func:`problem_of` is the one implementation of the structural checks
of a parsed request against the model's tensors: the pre-forward check
(:mod:`gateway.guard`) runs it on every request its straight pass does not take, and
:func:`explain` runs it too when an edge refuses a request (400, or the 500 Triton 2.51
answers for some bad JSON), then looks at the element values, and says which input is
wrong and how; a 500 that is one of Triton's request-parsing errors becomes a 400 even
when the explainer finds nothing more precise.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator
from typing import Any

from fedcore.strict_json import RepeatedKey, strict_decoder
from gateway.schemas import ModelSchema, TensorSchema

# Bytes per element; BYTES elements are length-prefixed and have no fixed size.
DTYPE_SIZES: dict[str, int | None] = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
    "BYTES": None,
}
_INT_RANGES = {
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
}
MAX_JSON_DEPTH = 64
"""Deepest JSON nesting forwarded to an edge (a rank-8 tensor as nested lists needs 12)."""
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
EXPLAIN_LIMIT = 4 * 1024 * 1024
"""JSON headers larger than this are not parsed to explain a refusal (CPU on error paths)."""
# Triton 2.51 answers 500 with these for requests it cannot parse: bad input, not a fault.
TRITON_PARSE_ERRORS = (
    "failed to parse the request JSON buffer",
    "Unable to parse '",
    "failed to get request params",
)


SHARED_MEMORY = "shared memory is not available through the gateway: send 'data' or binary data"
MAX_DIGITS = 18
"""Longest integer header parsed (Python's ``int()`` refuses past 4,300 digits, and nothing
the gateway counts, bytes included, comes near 10**18)."""


def parse_count(value: bytes) -> int | None:
    """A header's non-negative integer of at most :data:`MAX_DIGITS` ASCII digits, or None."""
    if not value.isdigit() or len(value) > MAX_DIGITS:
        return None
    return int(value)


def check_framing(header_length: bytes | None, body_length: int, encoded: bool) -> str | None:
    """The binary extension's ``Inference-Header-Content-Length`` against the body; hot path."""
    if header_length is None:
        return None
    length = parse_count(header_length)
    if length is None and header_length.isdigit():
        return (
            f"Inference-Header-Content-Length has {len(header_length)} digits: "
            f"a byte count has at most {MAX_DIGITS} digits"
        )
    if length is None:
        shown = header_length[:40].decode("latin-1")
        return f"Inference-Header-Content-Length must be a byte count, got {shown!r}"
    if not encoded and not 0 < length <= body_length:
        return (
            f"Inference-Header-Content-Length {length} is outside the body of {body_length} bytes"
        )
    return None


def check_depth(body: bytes, end: int, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Refuse JSON nested deeper than ``limit`` in ``body[:end]``; hot path.

    Triton 2.51 parses request JSON recursively: about a million nested brackets crash
    the server (measured here). Counting brackets is a C-speed scan and bounds the depth
    from above, so ordinary requests (flat ``data``) cost two ``bytes.count`` calls; only
    bodies with many brackets (nested ``data``) are tokenized to find the real depth.
    """
    if body.count(b"[", 0, end) + body.count(b"{", 0, end) <= limit:
        return None
    depth = 0
    for token in _JSON_TOKENS.finditer(body, 0, end):
        char = token.group()
        if char in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return f"request JSON is nested more than {limit} levels deep"
        elif char in (b"]", b"}"):
            depth -= 1
    return None


def is_triton_parse_error(message: str) -> bool:
    return message.startswith(TRITON_PARSE_ERRORS)


def decode_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The request body without its ``Content-Encoding``; raises ``ValueError``."""
    if not encoding or encoding == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"request body is not valid {encoding}: {exc}") from None
    if len(out) > limit:
        raise ValueError(f"decompressed request body exceeds {limit} bytes")
    return out


def explain(body: bytes, header_length: int | None, schema: ModelSchema) -> str | None:
    """What is wrong with an inference request for ``schema``, or None if nothing is found:
    the pre-forward check's problems (:func:`problem_of`), then the element values."""
    header = body if header_length is None else body[:header_length]
    payload = 0 if header_length is None else len(body) - header_length
    if len(header) > EXPLAIN_LIMIT:
        return None  # not worth parsing here: the edge's own answer stands
    doc, malformed = parse_request(header, header_length, _DECODER)
    if malformed:
        return malformed
    problem = problem_of(doc, schema, len(body), payload)
    if problem is None:
        problem = next(values_problems(doc["inputs"]), None)
    return problem


_DECODER = strict_decoder()


def parse_request(
    header: bytes, header_length: int | None, decoder: json.JSONDecoder
) -> tuple[Any, str | None]:
    """(the request's parsed JSON, None), or (None, why it is malformed): UTF-8 only, as
    Triton reads it, and no key repeated in one object (Python keeps the last copy,
    Triton's parser the first). ``decoder``: a :func:`fedcore.strict_json.strict_decoder`."""
    where = ""
    if header_length is not None:
        where = f" in the first {header_length} bytes (Inference-Header-Content-Length)"
    try:
        return decoder.decode(header.decode()), None
    except RepeatedKey as exc:
        return None, f"request JSON repeats the key {exc.key!r} in one object"
    except RecursionError:
        return None, f"malformed request JSON{where}: nested too deeply"
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"malformed request JSON{where}: {exc}"


def problem_of(doc: Any, schema: ModelSchema, limit: int, payload: int) -> str | None:
    """The first structural problem of a parsed request (``limit``: the body's size,
    ``payload``: the bytes after its JSON header), in order; None if there is none.
    Each checker yields problems in order and only the first is taken, so later checks
    never run on a request an earlier one found broken."""
    if not isinstance(doc, dict):
        return "the request must be a JSON object with an 'inputs' list"
    for checker in (
        request_problems(doc),
        _inputs_problems(doc.get("inputs"), schema, limit, payload),
        outputs_problems(doc.get("outputs"), schema),
    ):
        problem = next(checker, None)
        if problem is not None:
            return problem
    return None


def request_problems(doc: dict[str, Any]) -> Iterator[str]:
    if "id" in doc and not isinstance(doc["id"], str):
        yield f"request 'id' must be a string, got {type(doc['id']).__name__}"
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        yield "request 'parameters' must be an object"
    elif not isinstance(params.get("binary_data_output", False), bool):
        yield "request parameter 'binary_data_output' must be true or false"


def _inputs_problems(inputs: Any, schema: ModelSchema, limit: int, payload: int) -> Iterator[str]:
    if not isinstance(inputs, list) or not inputs:
        yield "'inputs' must be a non-empty list of tensors"
    known = {t.name: t for t in schema.inputs}
    seen: set[str] = set()
    binary_total = 0
    for index, item in enumerate(inputs):
        if not isinstance(item, dict):
            yield f"inputs[{index}] must be an object"
        name = item.get("name")
        if not isinstance(name, str):
            yield f"inputs[{index}] has no 'name' string"
        if name not in known:
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
    if not _is_int(size) or size < 0:
        yield f"binary_data_size must be a non-negative integer, got {size!r}"
    element = DTYPE_SIZES.get(spec.datatype)
    need = count * (element or 4)  # a BYTES element is at least its 4-byte length
    if (element is not None and size != need) or size < need:
        yield f"binary_data_size is {size} bytes, but shape {shape} of {datatype} needs {need}"


def _shape_problems(shape: Any, spec: TensorSchema, max_batch: int, limit: int) -> Iterator[str]:
    """Rank, fixed dimensions, no dimension beyond ``limit`` (the body's size), batch."""
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
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


def values_problems(inputs: list[dict[str, Any]]) -> Iterator[str]:
    """Element values of a structurally sound request's JSON ``data`` against their
    datatype (the pre-forward check only counts them; Triton refuses a bad one)."""
    for item in inputs:
        if "data" not in item:
            continue
        for position, value in enumerate(flatten(item["data"]) or ()):
            problem = _element_problem(value, item["datatype"])
            if problem:
                yield f"input '{item['name']}': 'data' element {position} ({value!r}) {problem}"


def _element_problem(value: Any, datatype: str) -> str | None:
    if datatype == "BOOL":
        return None if isinstance(value, bool) else "is not a boolean"
    if datatype == "BYTES":
        return None if isinstance(value, str) else "is not a string"
    if datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        if not _is_int(value):
            return f"is not an integer ({datatype})"
        return None if low <= value <= high else f"is out of range for {datatype}"
    return None if _is_int(value) or isinstance(value, float) else f"is not a number ({datatype})"


def flatten(data: Any) -> list[Any] | None:
    """Row-major elements of a (possibly nested) JSON list, or None if it is no list."""
    if not isinstance(data, list):
        return None
    if list not in map(type, data):  # flat (the usual case): a C-speed scan
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def outputs_problems(outputs: Any, schema: ModelSchema) -> Iterator[str]:
    if outputs is None:
        return
    if not isinstance(outputs, list):
        yield "'outputs' must be a list"
    known = {t.name for t in schema.outputs}
    for index, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            yield f"outputs[{index}] must be an object with a 'name'"
        name = item["name"]
        if name not in known:
            expected = ", ".join(repr(n) for n in sorted(known))
            yield f"unknown output '{name}' for model '{schema.name}' (it has {expected})"
        params = item.get("parameters", {})
        if not isinstance(params, dict):
            yield f"output '{name}': 'parameters' must be an object"
        elif not isinstance(params.get("binary_data", False), bool):
            yield f"output '{name}': parameter 'binary_data' must be true or false"
        elif "shared_memory_region" in params:
            yield f"output '{name}': {SHARED_MEMORY}"
