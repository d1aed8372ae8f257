"""The edge's Triton model repository: generated config plus verified, signed versions."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedcore.artifact import install_version
from fedcore.models import get_spec
from fedcore.triton_config import CaptureParams, InstanceKind, render_config

log = logging.getLogger(__name__)


def detect_kind() -> InstanceKind:
    """KIND_GPU when a CUDA device and ONNX Runtime's CUDA provider are both present."""
    import onnxruntime as ort

    has_device = Path("/dev/nvidia0").exists() or bool(os.environ.get("NVIDIA_VISIBLE_DEVICES"))
    has_provider = "CUDAExecutionProvider" in ort.get_available_providers()
    kind: InstanceKind = "KIND_GPU" if has_device and has_provider else "KIND_CPU"
    log.info(
        "inference device: %s (cuda device: %s, onnxruntime CUDA provider: %s)",
        kind,
        has_device,
        has_provider,
    )
    return kind


def available_versions(seed_dir: Path, model: str) -> list[int]:
    """Version numbers present under ``seed_dir/model``, ascending."""
    root = seed_dir / model
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def prepare_model(
    repository: Path,
    seed_dir: Path,
    model: str,
    kind: InstanceKind,
    trusted: ed25519.Ed25519PublicKey,
    capture: CaptureParams | None = None,
) -> int:
    """Write ``config.pbtxt`` and install the newest signed seed version. Returns it.

    ``capture`` (the edge's capture settings) goes into ``config.pbtxt`` for ``model.py``.

    Verification happens before anything is written into the model's directory; a bad
    artifact raises :class:`fedcore.errors.ArtifactError` and leaves the repository as it was.
    """
    spec = get_spec(model)
    versions = available_versions(seed_dir, model)
    if not versions:
        raise FileNotFoundError(f"no version of model {model!r} under {seed_dir / model}")
    version = versions[-1]
    model_dir = repository / model
    install_version(seed_dir / model / str(version), model_dir, trusted, version=version)
    (model_dir / "config.pbtxt").write_text(render_config(spec, kind, capture=capture))
    log.info("installed %s version %d", model, version, extra={"model": model, "version": version})
    return version
