"""A synthetic but physically plausible generator of pump sensor windows.

Each sample is one second of three sensors at 32 Hz on one of four machine types:

- vibration (g): the shaft's rotation frequency (type-dependent, 3..6 cycles per window)
  plus noise; **bearing wear** adds sharp periodic impulses (the defect frequency);
- bearing temperature (deg C): the type's baseline (55..70) plus slow noise;
  **overheating** adds a rising ramp of 4..10 degrees over the window;
- motor current (A): the type's baseline (8..14) with the load's ripple; overheating also
  draws a little more current.

``bench`` data (machine types 0 and 1 only, mild faults) is what version 1 was trained on
in the lab; ``field`` data (all four types, the faults as they show in the field, and a
slower temperature sensor) is what the edges see. Version 1 is therefore worse in the
field than it could be, which is what federated fine-tuning fixes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedcore.spec import DataSplit
from pump_health.model import CHANNELS, CLASSES, MACHINE_TYPES, WINDOW

_ROTATION = (3.0, 4.0, 5.0, 6.0)  # cycles per window, per machine type
_TEMP = (55.0, 60.0, 65.0, 70.0)
_CURRENT = (8.0, 10.0, 12.0, 14.0)


def generate(
    n: int, seed: int, *, field: bool = True
) -> tuple[dict[str, NDArray[Any]], NDArray[np.int64]]:
    """``n`` windows and their labels: ({"window": FP32 [n, T, C], "machine_type": INT64
    [n, 1]}, INT64 [n] classes)."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, MACHINE_TYPES if field else 2, size=n)
    labels = rng.integers(0, CLASSES, size=n)
    t = np.arange(WINDOW) / WINDOW
    window = np.empty((n, WINDOW, CHANNELS), dtype=np.float32)
    for i in range(n):
        k, y = int(types[i]), int(labels[i])
        phase = rng.uniform(0, 2 * np.pi)
        vib = 0.5 * np.sin(2 * np.pi * _ROTATION[k] * t + phase) + rng.normal(0, 0.15, WINDOW)
        temp = _TEMP[k] + rng.normal(0, 0.3, WINDOW)
        current = _CURRENT[k] + 0.3 * np.sin(2 * np.pi * 2 * t) + rng.normal(0, 0.2, WINDOW)
        if y == 1:  # bearing wear: impulses at the defect frequency
            period = int(rng.integers(5, 9))
            start = int(rng.integers(0, period))
            height = rng.uniform(0.8, 1.6) if field else rng.uniform(1.5, 2.5)
            vib[start::period] += height * rng.choice([-1.0, 1.0])
        elif y == 2:  # overheating: a temperature ramp, a little more current
            rise = rng.uniform(4.0, 10.0) if field else rng.uniform(8.0, 14.0)
            ramp = rise * t
            if field:  # the field's sensor lags: the ramp starts late and smooth
                ramp = rise * np.clip((t - 0.3) / 0.7, 0, 1) ** 2
            temp = temp + ramp
            current = current + rng.uniform(0.3, 0.8)
        window[i] = np.stack([vib, temp, current], axis=1)
    return {"window": window, "machine_type": types.reshape(n, 1).astype(np.int64)}, labels.astype(
        np.int64
    )


def demo_data() -> DataSplit:
    """The demo's traffic: field data, a training split the sites replay and a held-out
    split the demo scores through the gateway (the trainer never sees either)."""
    x_train, y_train = generate(1500, seed=101)
    x_test, y_test = generate(400, seed=202)
    return x_train, y_train, x_test, y_test
