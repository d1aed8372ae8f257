"""Export a spec's torch module to ONNX and check it.

Uses the TorchScript-based exporter (``dynamo=False``): it needs no ``onnxscript`` and
gives a deterministic graph for the small models fedgate serves. The batch axis of every
input and output is dynamic.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedcore.errors import ModelSpecError
from fedcore.spec import ModelSpec

if TYPE_CHECKING:
    import torch


def export_onnx(spec: ModelSpec, module: torch.nn.Module, path: Path) -> None:
    """Write ``module`` as ONNX to ``path`` with the spec's tensor names and a dynamic batch."""
    import onnx
    import torch

    module = module.eval()
    examples = tuple(
        torch.zeros((2, *t.shape), dtype=torch.from_numpy(np.zeros(1, t.numpy_dtype)).dtype)
        for t in spec.inputs
    )
    axes = {name: {0: "batch"} for name in (*spec.input_names, *spec.output_names)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            examples,
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=axes,
            opset_version=spec.opset,
            dynamo=False,
        )
    onnx.checker.check_model(str(path), full_check=True)


def check_onnx_matches_torch(
    spec: ModelSpec, module: torch.nn.Module, path: Path, samples: NDArray[Any], atol: float = 1e-5
) -> float:
    """Run ``samples`` through ONNX Runtime and torch; raise if they differ by more than
    ``atol`` times the largest output magnitude (at least 1: float32 rounding grows with
    the values, and trained logits reach tens). Returns max |diff|."""
    import onnxruntime as ort
    import torch

    if len(spec.inputs) != 1 or len(spec.outputs) != 1:
        raise ModelSpecError("check_onnx_matches_torch handles single-input, single-output models")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = np.ascontiguousarray(samples, dtype=spec.inputs[0].numpy_dtype)
    (ort_out,) = session.run(spec.output_names, {spec.input_names[0]: feed})
    with torch.no_grad():
        torch_out = module.eval()(torch.from_numpy(feed)).numpy()
    diff = float(np.max(np.abs(ort_out - torch_out))) if feed.size else 0.0
    scale = max(1.0, float(np.max(np.abs(torch_out)))) if feed.size else 1.0
    if not diff <= atol * scale:
        raise ModelSpecError(
            f"{spec.name}: ONNX Runtime differs from torch by {diff} > {atol * scale:.3g} "
            f"({atol} x largest output {scale:.3g})"
        )
    return diff
