"""Version 1 of a model: the user's pretrained weights, or for a built-in, a short bootstrap.

A model with ``initial_weights`` (safetensors) starts from them. A built-in model without
any trains briefly on a small public seed set (a tenth of its train split by default):
deliberately modest, the edges improve it from their own traffic. Either way version 1 is
exported to ONNX, checked against torch, given its generated ``model.py`` and signed like
every later version.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from numpy.typing import NDArray

from fedcore.artifact import MANIFEST, seal_version_dir, sign_version_dir, staging_dir
from fedcore.errors import ModelSpecError
from fedcore.modelrun import make_optimizer, target_output, to_tensors
from fedcore.params import flatten
from fedcore.spec import ModelSpec, TrainingRecipe
from fedcore.task import torch_loss
from fedcore.triton_model import MODEL_PY, WEIGHTS_FILE, render_model_py
from fedcore.weights import dummy_batch, evaluation_data, load_initial_weights
from trainer.export_child import export_in_child

log = logging.getLogger(__name__)


def train_seed_model(
    spec: ModelSpec,
    fraction: float,
    epochs: int,
    seed: int,
    recipe: TrainingRecipe | None = None,
) -> NDArray[Any]:
    """Train ``spec``'s module briefly on a seed slice; return its flat parameters.

    ``recipe`` (None: the spec's; the trainer passes it with its ``LOCAL_*`` settings
    over it) gives the optimiser, its momentum and weight decay, and the batch size; the
    learning rate is the spec's ``bootstrap_lr``."""
    import torch

    if spec.dataset is None or not spec.builtin:
        raise ModelSpecError(
            f"model {spec.name!r}: no initial_weights; only built-in models are bootstrapped"
        )
    torch.manual_seed(seed)
    x_train, y_train, _, _ = spec.dataset()
    rng = np.random.default_rng(seed)
    take = rng.permutation(len(y_train))[: max(10, int(len(y_train) * fraction))]
    feeds = {k: v[take] for k, v in spec.feeds(x_train).items()}
    inputs = to_tensors(spec, feeds)
    y = torch.from_numpy(y_train[take])
    module = spec.build_module()
    recipe = spec.recipe if recipe is None else recipe
    opt = make_optimizer(recipe, module, lr=spec.bootstrap_lr)
    batch = recipe.batch_size
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for start in range(0, len(y), batch):
            idx = perm[start : start + batch]
            opt.zero_grad()
            out = target_output(spec, module, [t[idx] for t in inputs])
            torch_loss(spec.task, out, y[idx]).mean().backward()  # type: ignore[no-untyped-call]
            opt.step()
    return flatten(module)


def initial_params(
    spec: ModelSpec,
    fraction: float,
    epochs: int,
    seed: int,
    recipe: TrainingRecipe | None = None,
) -> NDArray[Any]:
    """Version 1's flat parameters: the user's safetensors weights, else a bootstrap
    (:func:`train_seed_model` with ``recipe``)."""
    if spec.initial_weights is None:
        log.info("training version 1 of %s on a %.0f%% seed set", spec.name, fraction * 100)
        return train_seed_model(spec, fraction, epochs, seed, recipe)
    log.info("version 1 of %s from %s", spec.name, spec.initial_weights)
    module = spec.build_module()
    load_initial_weights(spec, module)
    return flatten(module)


def write_version(
    spec: ModelSpec,
    params: NDArray[Any],
    directory: Path,
    key: ed25519.Ed25519PrivateKey,
    *,
    version: int,
    parent_version: int | None = None,
    round_no: int | None = None,
) -> None:
    """Write the flat parameters, export and check the ONNX (in a short-lived child
    process: :mod:`trainer.export_child`), render ``model.py`` and sign one version
    directory: written beside it, then made read-only and renamed into place
    (:func:`fedcore.artifact.seal_version_dir`); a released version is never rewritten."""
    staging = staging_dir(directory)
    try:
        # the flat FP32 parameters, for edges that fine-tune from this version (no pickle);
        # no copy when they are FP32 already
        weights = np.asarray(params, dtype="<f4")
        np.save(staging / WEIGHTS_FILE, weights, allow_pickle=False)
        child_mb = export_in_child(spec, staging, _check_batch)
        log.info("%s exported and checked in a child (peak RSS %.0f MB)", spec.name, child_mb)
        (staging / MODEL_PY).write_text(render_model_py(spec))
        sign_version_dir(
            staging,
            key,
            model=spec.name,
            version=version,
            parent_version=parent_version,
            round_no=round_no,
        )
        seal_version_dir(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_batch(spec: ModelSpec) -> dict[str, NDArray[Any]]:
    """Rows to compare ONNX Runtime with torch on: evaluation rows when there are some."""
    data = evaluation_data(spec)
    if data is None or len(data[1]) == 0:
        return dummy_batch(spec, rows=16)
    return {k: v[:64] for k, v in spec.feeds(data[0]).items()}


def ensure_version_one(
    spec: ModelSpec,
    artifacts: Path,
    state: Path,
    key: ed25519.Ed25519PrivateKey,
    *,
    fraction: float,
    epochs: int,
    seed: int,
    recipe: TrainingRecipe | None = None,
) -> Path:
    """Create version 1 of ``spec`` if it does not exist yet (a bootstrap trains with
    ``recipe``, None: the spec's); return its directory."""
    directory = artifacts / spec.name / "1"
    if (directory / MANIFEST).exists():
        return directory
    params = initial_params(spec, fraction, epochs, seed, recipe)
    state.mkdir(parents=True, exist_ok=True)
    np.save(state / f"{spec.name}-1.npy", params, allow_pickle=False)
    write_version(spec, params, directory, key, version=1)
    log.info("version 1 of %s written to %s", spec.name, directory)
    return directory
