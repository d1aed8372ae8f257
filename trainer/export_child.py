"""Export a version's ONNX and check it, in a short-lived child process.

``torch.onnx.export``, ``onnx.checker`` (full check) and the ONNX Runtime parity check
each hold several copies of the model at once (measured at 25M parameters: +4.3x,
+2.8x and +1.8x the FP32 model above what the trainer holds). Run in the long-lived
trainer they set its peak resident memory for good; in a forked child they are given
back to the system when it exits. The child inherits the spec and the module's code
(fork: nothing is pickled), reads the parameters from the version's ``weights.npy``
(memory-mapped), refuses an ONNX file that refers to external data (so the trainer's
verification of the signed directory need not parse the file again) and answers over a
pipe in JSON. What it costs is real memory while it runs: :func:`export_in_child`
returns the child's peak resident set.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import resource
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import ArtifactError, ModelSpecError
from fedcore.spec import ModelSpec
from fedcore.triton_model import ONNX_FILE, WEIGHTS_FILE
from trainer.errors import TrainerError

log = logging.getLogger(__name__)

Batch = Callable[[ModelSpec], Any]


def export_in_child(spec: ModelSpec, directory: Path, batch: Batch) -> float:
    """Write ``directory/model.onnx`` from ``directory/weights.npy`` and check it against
    torch on ``batch(spec)``, in a forked child. Raises :class:`ModelSpecError` when the
    export or its check refuses the model (as in-process), :class:`TrainerError`
    (``export-child``) when the child fails otherwise. Returns the child's peak RSS, MB."""
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_run, args=(spec, directory, batch, writer), daemon=True)
    child.start()
    writer.close()
    try:
        raw = reader.recv_bytes()
    except EOFError:
        raw = b""
    finally:
        reader.close()
        child.join()
    answer: dict[str, Any] = json.loads(raw) if raw else {}
    if answer.get("ok"):
        return float(answer["rss_mb"])
    if answer.get("kind") == "spec":
        raise ModelSpecError(str(answer["error"]))
    detail = answer.get("error") or f"exit code {child.exitcode}"
    raise TrainerError("export-child", f"{spec.name}: ONNX export failed: {detail}")


def _run(spec: ModelSpec, directory: Path, batch: Batch, answer: Connection) -> None:
    """The child: export, check, answer, exit (multiprocessing ends it with os._exit)."""
    out: dict[str, Any]
    try:
        import torch

        from fedcore.artifact import check_self_contained
        from fedcore.onnx_export import check_onnx_matches_torch, export_onnx
        from fedcore.params import load_flat

        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive a fork
        module = spec.build_module()
        params = np.load(directory / WEIGHTS_FILE, mmap_mode="r", allow_pickle=False)
        load_flat(module, params)
        del params
        export_onnx(spec, module, directory / ONNX_FILE)
        check_onnx_matches_torch(spec, module, directory / ONNX_FILE, batch(spec))
        check_self_contained(directory / ONNX_FILE)  # here, not in the trainer: see verify
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
        out = {"ok": True, "rss_mb": peak, "pid": os.getpid()}
    except (ModelSpecError, ArtifactError) as exc:  # the candidate cannot be served
        out = {"ok": False, "kind": "spec", "error": str(exc)}
    except Exception as exc:  # reported to the parent, which raises
        out = {"ok": False, "kind": "other", "error": f"{type(exc).__name__}: {exc}"}
    answer.send_bytes(json.dumps(out).encode())
    answer.close()
