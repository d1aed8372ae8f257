"""Render a Triton ``config.pbtxt`` from a model spec.

The model runs on Triton's python backend (``model.py`` executing the ONNX file with ONNX
Runtime). ``KIND_GPU`` or ``KIND_CPU`` is the edge's choice; dynamic batching and a
``latest { num_versions: N }`` policy (a stable and a candidate version side by side) come
from the spec. Traffic capture (:class:`CaptureParams`) is the edge's own setting: the
spool path, sample rate and capacities go into ``parameters`` entries that the rendered
``model.py`` reads (``config.pbtxt`` is written by the edge; it is not part of the signed
version).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from fedcore.errors import ModelSpecError
from fedcore.spec import ModelSpec, TensorSpec
from fedcore.triton_model import (
    PARAM_CAPTURE_RATE,
    PARAM_SPOOL_CAPACITY,
    PARAM_SPOOL_PATH,
    PARAM_SPOOL_TOMBSTONES,
)

InstanceKind = Literal["KIND_CPU", "KIND_GPU"]


@dataclass(frozen=True)
class CaptureParams:
    """What ``model.py`` captures: the share of requests with an id, where, how many."""

    spool_path: str
    rate: float
    capacity: int
    tombstones: int

    def __post_init__(self) -> None:
        if not math.isfinite(self.rate) or not 0.0 <= self.rate <= 1.0:
            raise ModelSpecError(f"capture rate {self.rate} is not in [0, 1]")
        if self.capacity < 1 or self.tombstones < 1:
            raise ModelSpecError("spool capacity and tombstone capacity must be positive")
        if not self.spool_path or any(c in self.spool_path for c in '"\\\n\r'):
            raise ModelSpecError(f"spool path {self.spool_path!r} cannot be put in config.pbtxt")

    def render(self) -> str:
        """The ``parameters`` entries of ``config.pbtxt``."""
        values = {
            PARAM_SPOOL_PATH: self.spool_path,
            PARAM_CAPTURE_RATE: repr(float(self.rate)),
            PARAM_SPOOL_CAPACITY: str(self.capacity),
            PARAM_SPOOL_TOMBSTONES: str(self.tombstones),
        }
        return "".join(
            f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n'
            for k, v in values.items()
        )


def _tensor_block(tensors: tuple[TensorSpec, ...]) -> str:
    rows = []
    for t in tensors:
        dims = ", ".join(map(str, t.shape))
        rows.append(f'  {{ name: "{t.name}" data_type: {t.triton_type} dims: [ {dims} ] }}')
    return ",\n".join(rows)


def render_config(
    spec: ModelSpec,
    kind: InstanceKind = "KIND_CPU",
    instances: int = 1,
    capture: CaptureParams | None = None,
) -> str:
    """The ``config.pbtxt`` text for ``spec``; ``capture`` turns traffic capture on."""
    preferred = ", ".join(str(b) for b in spec.preferred_batch_sizes)
    return (
        f'name: "{spec.name}"\n'
        'backend: "python"\n'
        f"max_batch_size: {spec.max_batch_size}\n"
        f"version_policy: {{ latest: {{ num_versions: {spec.versions_kept} }} }}\n"
        f"input [\n{_tensor_block(spec.inputs)}\n]\n"
        f"output [\n{_tensor_block(spec.outputs)}\n]\n"
        f"instance_group [ {{ kind: {kind} count: {instances} }} ]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {spec.max_queue_delay_us}\n"
        "}\n"
        f"{capture.render() if capture is not None else ''}"
    )


def config_summary(config: dict[str, Any]) -> dict[str, Any]:
    """The fields fedgate sets, picked out of Triton's ``GET .../config`` JSON.

    Compare it with :func:`spec_summary` to prove a served model is what its spec says.
    """
    batching = config.get("dynamic_batching") or {}
    return {
        "name": config.get("name"),
        "backend": config.get("backend"),
        "max_batch_size": config.get("max_batch_size"),
        "version_policy": config.get("version_policy"),
        "input": [(t["name"], t["data_type"], list(t["dims"])) for t in config.get("input", [])],
        "output": [(t["name"], t["data_type"], list(t["dims"])) for t in config.get("output", [])],
        "kind": [g.get("kind") for g in config.get("instance_group", [])],
        "preferred_batch_size": list(batching.get("preferred_batch_size", [])),
        "max_queue_delay_microseconds": int(batching.get("max_queue_delay_microseconds", 0)),
    }


def spec_summary(spec: ModelSpec, kind: InstanceKind = "KIND_CPU") -> dict[str, Any]:
    """What :func:`config_summary` must return for a model rendered from ``spec``."""
    return {
        "name": spec.name,
        "backend": "python",
        "max_batch_size": spec.max_batch_size,
        "version_policy": {"latest": {"num_versions": spec.versions_kept}},
        "input": [(t.name, t.triton_type, list(t.shape)) for t in spec.inputs],
        "output": [(t.name, t.triton_type, list(t.shape)) for t in spec.outputs],
        "kind": [kind],
        "preferred_batch_size": list(spec.preferred_batch_sizes),
        "max_queue_delay_microseconds": spec.max_queue_delay_us,
    }
