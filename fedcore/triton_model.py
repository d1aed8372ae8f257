"""Render the python-backend ``model.py`` that serves a spec's ONNX file in Triton.

The rendered file holds the spec's tensor names and dtypes as constants; it opens
``model.onnx`` from its own version directory with ONNX Runtime, using the TensorRT and
CUDA execution providers when the instance is ``KIND_GPU`` and they are available, CPU
otherwise, and logs the providers it got. Dynamic batches are run as one ONNX call.

Traffic capture: when the edge's ``config.pbtxt`` names a spool (``fedgate_spool_path``)
and a capture rate above zero, a sampled share of single-row requests that carry an OIP
``id`` is kept: request id (``<key name>/<id>`` when the gateway named the key that made
the request, so a label binds to that key), and the bytes of the inputs and outputs the
spec's task captures (all by default), each list back to back in declared order. The
request path only appends a tuple to an in-memory queue (about a microsecond); a writer
thread in the stub inserts the queue into the edge's SQLite spool (WAL) every
``CAPTURE_FLUSH_S`` in one transaction and evicts the oldest samples beyond the capacity,
leaving a tombstone per evicted request id (so late feedback for it is told "expired").
The capture code is :data:`CAPTURE_SOURCE`, rendered verbatim into ``model.py`` (the stub
can import only what is signed in the version directory); ``edge_runtime.spool`` reads the
same schema.
"""

from __future__ import annotations

from string import Template

from fedcore.spec import ModelSpec

ONNX_FILE = "model.onnx"
MODEL_PY = "model.py"
WEIGHTS_FILE = "weights.npy"  # flat FP32 parameters (np.save, allow_pickle=False)

# config.pbtxt parameters the capture code reads (written by the edge, not signed)
PARAM_CAPTURE_RATE = "fedgate_capture_rate"
PARAM_SPOOL_PATH = "fedgate_spool_path"
PARAM_SPOOL_CAPACITY = "fedgate_spool_capacity"
PARAM_SPOOL_TOMBSTONES = "fedgate_spool_tombstones"

SPOOL_SCHEMA = """\
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    captured_ts REAL NOT NULL,
    version INTEGER NOT NULL,
    inputs BLOB NOT NULL,
    outputs BLOB NOT NULL,
    label INTEGER,
    weight REAL,
    label_seq INTEGER
);
CREATE INDEX IF NOT EXISTS samples_label_seq ON samples (label_seq);
CREATE TABLE IF NOT EXISTS tombstones (
    request_id TEXT PRIMARY KEY,
    evicted_ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
"""The spool's tables: ``samples`` (one captured request each; ``label`` joined later),
``tombstones`` (request ids evicted from ``samples``), ``meta`` (the edge's counters)."""

CAPTURE_SOURCE = '''\
CAPTURE_FLUSH_S = 0.05
CAPTURE_MAX_PENDING = 10000
_INSERT = (
    "INSERT OR REPLACE INTO samples (request_id, captured_ts, version, inputs, outputs) "
    "VALUES (?, ?, ?, ?, ?)"
)
_TOMBSTONE = (
    "INSERT OR REPLACE INTO tombstones (request_id, evicted_ts) "
    "SELECT request_id, ? FROM samples WHERE seq <= (SELECT MAX(seq) FROM samples) - ?"
)
_EVICT = "DELETE FROM samples WHERE seq <= (SELECT MAX(seq) FROM samples) - ?"
_EVICT_TOMBSTONES = "DELETE FROM tombstones WHERE rowid <= (SELECT MAX(rowid) FROM tombstones) - ?"
KEY_PARAM = "x-fedgate-key"


def bound_id(request_id, parameters):
    """The id a request is spooled under: ``<key name>/<id>`` when the gateway named the
    key that made it (its ``x-fedgate-key`` header, a request parameter here), else ``id``."""
    if not request_id:
        return request_id
    try:
        key = json.loads(parameters or "{}").get(KEY_PARAM)
    except (ValueError, AttributeError):
        key = None
    return f"{key}/{request_id}" if isinstance(key, str) and key else request_id


def open_spool(path, timeout_s=5.0):
    """A connection to the spool at ``path`` (WAL, schema created if missing)."""
    conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SPOOL_SCHEMA)
    return conn


class CaptureWriter:
    """Queues sampled rows on the request path; a thread writes them in batches."""

    def __init__(self, path, rate, capacity, tombstones, version, log=None):
        self.path, self.rate, self.version = path, float(rate), int(version)
        self.capacity, self.tombstones = int(capacity), int(tombstones)
        self.log = log or (lambda message: None)
        self.pending = collections.deque()
        self.dropped = 0
        self.written = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conn = open_spool(path)
        self._thread = threading.Thread(target=self._run, name="fedgate-capture", daemon=True)
        self._thread.start()

    def offer(self, request_id, inputs, outputs):
        """Keep one request (input and output arrays of one row) with probability ``rate``."""
        if not request_id or random.random() >= self.rate:
            return False
        if len(self.pending) >= CAPTURE_MAX_PENDING:
            self.dropped += 1
            return False
        self.pending.append((
            request_id,
            time.time(),
            self.version,
            b"".join(a.tobytes() for a in inputs),
            b"".join(a.tobytes() for a in outputs),
        ))
        return True

    def flush(self):
        """Write everything queued so far in one transaction, then evict beyond capacity."""
        with self._lock:
            rows = []
            while self.pending:
                rows.append(self.pending.popleft())
            return self._write(rows) if rows else 0

    def _write(self, rows):
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, rows)
            conn.execute(_TOMBSTONE, (time.time(), self.capacity))
            conn.execute(_EVICT, (self.capacity,))
            conn.execute(_EVICT_TOMBSTONES, (self.tombstones,))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.dropped += len(rows)
            self.log(f"fedgate capture: {len(rows)} samples not spooled: {exc}")
            return 0
        self.written += len(rows)
        return len(rows)

    def _run(self):
        while not self._stop.wait(CAPTURE_FLUSH_S):
            self.flush()

    def close(self):
        """Stop the writer thread, write what is queued, close the spool."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.flush()
        self._conn.close()


def capture_from_config(config, version, log=None):
    """A :class:`CaptureWriter` if ``config.pbtxt`` asks for capture, else None."""
    params = config.get("parameters") or {}

    def param(key, default):
        return (params.get(key) or {}).get("string_value", default)

    path, rate = param("$p_path", ""), float(param("$p_rate", "0"))
    if not path or rate <= 0.0:
        return None
    capacity = int(param("$p_capacity", "10000"))
    tombstones = int(param("$p_tombstones", str(10 * capacity)))
    return CaptureWriter(path, min(rate, 1.0), capacity, tombstones, version, log)
'''

_TEMPLATE = Template('''\
"""Triton python-backend model for "$model", generated by fedgate from its model spec."""

import collections
import json
import os
import random
import sqlite3
import threading
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUTS = $inputs
OUTPUTS = $outputs
CAPTURED_INPUTS = $captured_inputs
CAPTURED_OUTPUTS = $captured_outputs
ONNX_FILE = "$onnx_file"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
SPOOL_SCHEMA = """$schema"""

$capture

class TritonPythonModel:
    def initialize(self, args):
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(version_dir, ONNX_FILE)
        available = ort.get_available_providers()
        providers = []
        if args.get("model_instance_kind") == "GPU":
            device = {"device_id": int(args.get("model_instance_device_id", "0"))}
            providers = [(p, device) for p in GPU_PROVIDERS if p in available]
        providers.append("CPUExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("FEDGATE_ORT_THREADS", "1"))
        self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        pb_utils.Logger.log_info(
            f"$model version {args['model_version']}: ONNX Runtime providers "
            f"{self.session.get_providers()}"
        )
        self.capture = capture_from_config(
            json.loads(args["model_config"]), args["model_version"], pb_utils.Logger.log_warn
        )
        if self.capture is not None:
            pb_utils.Logger.log_info(
                f"$model version {args['model_version']}: capturing {self.capture.rate:.0%} "
                f"of requests with an id into {self.capture.path}"
            )

    def execute(self, requests):
        columns = {name: [] for name, _ in INPUTS}
        sizes = []
        for request in requests:
            for name, dtype in INPUTS:
                array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                columns[name].append(array.astype(dtype, copy=False))
            sizes.append(len(columns[INPUTS[0][0]][-1]))
        feeds = {n: (np.concatenate(v) if len(v) > 1 else v[0]) for n, v in columns.items()}
        results = self.session.run([name for name, _ in OUTPUTS], feeds)
        responses = []
        start = 0
        for i, (request, size) in enumerate(zip(requests, sizes)):
            outs = [
                np.ascontiguousarray(out[start : start + size], dtype=dtype)
                for (_, dtype), out in zip(OUTPUTS, results)
            ]
            if self.capture is not None and size == 1:
                inputs = [columns[name][i] for name in CAPTURED_INPUTS]
                kept = [o for (name, _), o in zip(OUTPUTS, outs) if name in CAPTURED_OUTPUTS]
                rid = bound_id(request.request_id(), request.parameters())
                self.capture.offer(rid, inputs, kept)
            tensors = [pb_utils.Tensor(name, o) for (name, _), o in zip(OUTPUTS, outs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self):
        if self.capture is not None:
            self.capture.close()
''')

_CAPTURE = Template(CAPTURE_SOURCE).substitute(
    p_path=PARAM_SPOOL_PATH,
    p_rate=PARAM_CAPTURE_RATE,
    p_capacity=PARAM_SPOOL_CAPACITY,
    p_tombstones=PARAM_SPOOL_TOMBSTONES,
)
CAPTURE_IMPORTS = "".join(
    f"import {name}\n" for name in ("collections", "json", "random", "sqlite3", "threading", "time")
)


def capture_source() -> str:
    """The capture code exactly as ``model.py`` holds it, runnable on its own (for tests
    and benchmarks): imports, ``SPOOL_SCHEMA``, ``open_spool``, ``CaptureWriter``."""
    return f'{CAPTURE_IMPORTS}SPOOL_SCHEMA = """{SPOOL_SCHEMA}"""\n\n{_CAPTURE}'


def render_model_py(spec: ModelSpec) -> str:
    """The python-backend ``model.py`` source for ``spec``."""
    inputs = [(t.name, t.numpy_dtype.str) for t in spec.inputs]
    outputs = [(t.name, t.numpy_dtype.str) for t in spec.outputs]
    return _TEMPLATE.substitute(
        model=spec.name,
        inputs=repr(inputs),
        outputs=repr(outputs),
        captured_inputs=repr([t.name for t in spec.captured_inputs]),
        captured_outputs=repr([t.name for t in spec.captured_outputs]),
        onnx_file=ONNX_FILE,
        schema=SPOOL_SCHEMA,
        capture=_CAPTURE,
    )
