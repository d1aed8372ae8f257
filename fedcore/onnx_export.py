"""Export a spec's torch module to ONNX and check it.

Uses the TorchScript-based exporter (``dynamo=False``): it needs no ``onnxscript`` and
gives a deterministic graph for the small models fedgate serves. The batch axis of every
input and output is dynamic, and so is every dim the spec declares as -1.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedcore.errors import ModelSpecError
from fedcore.modelrun import predict
from fedcore.spec import ModelSpec, TensorSpec

if TYPE_CHECKING:
    import torch


def export_onnx(spec: ModelSpec, module: torch.nn.Module, path: Path) -> None:
    """Write ``module`` as ONNX to ``path`` with the spec's tensor names and a dynamic batch."""
    import onnx
    import torch

    module = module.eval()
    examples = tuple(
        torch.from_numpy(np.zeros((2, *(d if d > 0 else 2 for d in t.shape)), t.numpy_dtype))
        for t in spec.inputs
    )
    axes = {t.name: _dynamic_axes(t) for t in (*spec.inputs, *spec.outputs)}
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


def _dynamic_axes(t: TensorSpec) -> dict[int, str]:
    axes = {0: "batch"}
    axes.update({i + 1: f"{t.name}_{i + 1}" for i, d in enumerate(t.shape) if d == -1})
    return axes


def check_onnx_matches_torch(
    spec: ModelSpec,
    module: torch.nn.Module,
    path: Path,
    samples: Any,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> float:
    """Run ``samples`` (an array for one-input models, else arrays by input name) through
    ONNX Runtime and torch; raise if any output differs by more than ``atol + rtol*|torch|``
    (FP32 rounding grows with magnitude: a regression's outputs are in the hundreds).
    Returns the largest |diff|."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: np.ascontiguousarray(v) for n, v in spec.feeds(samples).items()}
    ort_outs = session.run(spec.output_names, feeds)
    torch_outs = predict(spec, module, feeds)
    diff, within = 0.0, True
    for name, ort_out in zip(spec.output_names, ort_outs, strict=True):
        mine: NDArray[Any] = torch_outs[name]
        if ort_out.shape != mine.shape:
            raise ModelSpecError(
                f"{spec.name}: output {name!r} has shape {ort_out.shape} in ONNX Runtime, "
                f"{mine.shape} in torch"
            )
        if ort_out.size:
            reference = mine.astype(np.float64)
            gap = np.abs(ort_out.astype(np.float64) - reference)
            diff = max(diff, float(np.max(gap)))
            # FP32 rounding grows with the values an output is computed from: the largest
            # output of the batch (at least 1) scales the absolute tolerance
            scale = max(1.0, float(np.max(np.abs(reference))))
            within = within and bool(np.all(gap <= atol * scale + rtol * np.abs(reference)))
    if not within:
        raise ModelSpecError(
            f"{spec.name}: ONNX Runtime differs from torch by {diff} > {atol} x the largest output"
        )
    return diff
