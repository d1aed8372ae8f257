"""Deep checks of a model spec before any service relies on it (needs torch).

The module is built and run on a dummy batch: every declared output must come back with
the declared dtype and shape (variable dims aside). Initial weights must name exactly the
module's tensors with their shapes (a pickle is refused unread), and an evaluation set
must load. Each failure is a ModelSpecError naming the field and the problem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedcore.errors import ModelSpecError
from fedcore.spec import ModelSpec


def check_outputs(spec: ModelSpec) -> None:
    """Run the module on a dummy batch; the outputs must match the declared ones."""
    from fedcore.modelrun import predict
    from fedcore.weights import dummy_batch

    try:
        module = spec.build_module()
    except Exception as exc:  # the user's factory: any failure is a bad spec
        raise ModelSpecError(f"module_factory failed: {type(exc).__name__}: {exc}") from None
    rows = 4
    try:
        outs = predict(spec, module, dummy_batch(spec, rows=rows))
    except ModelSpecError:
        raise
    except Exception as exc:  # the user's forward on the declared inputs
        raise ModelSpecError(
            f"inputs: the module fails on a dummy batch of the declared inputs: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    for t in spec.outputs:
        got = outs[t.name]
        if got.dtype != t.numpy_dtype:
            raise ModelSpecError(
                f"outputs: {t.name!r} is declared {t.datatype} but the module returns {got.dtype}"
            )
        want = (rows, *t.shape)
        if len(got.shape) != len(want) or any(
            w not in (-1, g) for g, w in zip(got.shape, want, strict=True)
        ):
            raise ModelSpecError(
                f"outputs: {t.name!r} is declared [batch, {', '.join(map(str, t.shape))}] "
                f"but the module returns shape {list(got.shape)} for a batch of {rows}"
            )


def check_spec(spec: ModelSpec) -> None:
    """Every deep check of ``spec``; raises ModelSpecError at the first problem."""
    from fedcore.weights import evaluation_data, load_initial_weights

    check_outputs(spec)
    if spec.initial_weights is not None:
        load_initial_weights(spec, spec.build_module())
    elif not (spec.builtin and spec.dataset is not None):
        raise ModelSpecError(
            "initial_weights: needed (a safetensors file of the module's state_dict); only "
            "built-in models are bootstrapped from a data set"
        )
    if spec.evaluation_set is not None:
        data = evaluation_data(spec)
        if data is not None and not np.all(np.isfinite(np.asarray(data[1], dtype=np.float64))):
            raise ModelSpecError(
                f"evaluation_set: {Path(spec.evaluation_set)} has non-finite labels"
            )
