"""Render a Triton ``config.pbtxt`` from a model spec.

The model runs on Triton's python backend (``model.py`` executing the ONNX file with ONNX
Runtime). ``KIND_GPU`` or ``KIND_CPU`` is the edge's choice; dynamic batching and a
``latest { num_versions: N }`` policy (a stable and a candidate version side by side) come
from the spec.
"""

from __future__ import annotations

from typing import Any, Literal

from fedcore.spec import ModelSpec, TensorSpec

InstanceKind = Literal["KIND_CPU", "KIND_GPU"]


def _tensor_block(tensors: tuple[TensorSpec, ...]) -> str:
    rows = []
    for t in tensors:
        dims = ", ".join(map(str, t.shape))
        rows.append(f'  {{ name: "{t.name}" data_type: {t.triton_type} dims: [ {dims} ] }}')
    return ",\n".join(rows)


def render_config(spec: ModelSpec, kind: InstanceKind = "KIND_CPU", instances: int = 1) -> str:
    """The ``config.pbtxt`` text for ``spec``."""
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
