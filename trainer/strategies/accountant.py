"""Privacy accounting for central DP: an RDP accountant and a per-model epsilon ledger.

Each DP release (one round's noisy aggregate) is a sampled Gaussian mechanism with
noise multiplier ``z`` (noise std over clip norm) and sampling rate ``q`` (the chance
that a given edge takes part; 1.0 when nothing is known about sampling, which is the
conservative choice, and the only one the trainer uses: its cohorts are not Poisson
samples, see :mod:`trainer.strategies.dp`). Its Renyi DP at integer order ``a``
(Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019) is::

    rdp(a) = log( sum_{k=0..a} C(a,k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 z^2)) ) / (a - 1)

which is ``a / (2 z^2)`` for ``q = 1`` (at any real order). RDP adds up over releases;
the total converts to ``(epsilon, delta)`` with Balle et al. (2020)::

    epsilon = min_a  rdp(a) + log((a-1)/a) - (log(delta) + log(a)) / (a - 1)

For ``q < 1`` the fractional orders use the value at the next integer order, a valid
upper bound since RDP is non-decreasing in the order.

:class:`PrivacyLedger` keeps, per model, every release in a JSON file (written
atomically) and refuses a release that would take the model past its budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.files import write_atomic
from trainer.aggregate import F64Array
from trainer.errors import LedgerError, PrivacyBudgetExceeded

DEFAULT_ORDERS: tuple[float, ...] = (
    1.25,
    1.5,
    1.75,
    *(float(a) for a in range(2, 65)),
    80.0,
    96.0,
    128.0,
    192.0,
    256.0,
    512.0,
)
LEDGER_FORMAT = "fedgate-privacy-ledger/1"


def _log_a_integer(q: float, z: float, alpha: int) -> float:
    """``log A_alpha`` of the sampled Gaussian mechanism at integer ``alpha``, 0 < q < 1."""
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = (
        math.lgamma(alpha + 1)
        - np.array([math.lgamma(i + 1) for i in range(alpha + 1)])
        - np.array([math.lgamma(alpha - i + 1) for i in range(alpha + 1)])
    )
    terms = log_binom + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2.0 * z * z)
    top = float(terms.max())
    return top + math.log(float(np.exp(terms - top).sum()))


def rdp_sampled_gaussian(
    sample_rate: float, noise_multiplier: float, orders: tuple[float, ...] = DEFAULT_ORDERS
) -> F64Array:
    """RDP of one sampled Gaussian release at each order (inf where unbounded)."""
    q, z = float(sample_rate), float(noise_multiplier)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sample rate must lie in [0, 1], got {sample_rate}")
    if any(a <= 1.0 for a in orders):
        raise ValueError("RDP orders must be > 1")
    out = np.empty(len(orders), dtype=np.float64)
    for i, a in enumerate(orders):
        if q == 0.0:
            out[i] = 0.0
        elif z <= 0.0:
            out[i] = math.inf
        elif q == 1.0:
            out[i] = a / (2.0 * z * z)
        else:
            ia = math.ceil(a)
            out[i] = _log_a_integer(q, z, ia) / (ia - 1)
    return out


def epsilon_from_rdp(
    rdp: F64Array, delta: float, orders: tuple[float, ...] = DEFAULT_ORDERS
) -> tuple[float, float]:
    """``(epsilon, best_order)`` at ``delta`` from accumulated RDP values."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    if not np.any(rdp > 0.0):
        return 0.0, float(a[0])  # nothing was released (or every release had q = 0)
    with np.errstate(invalid="ignore"):
        eps = rdp + np.log((a - 1.0) / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    eps = np.where(np.isnan(eps), math.inf, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(a[best])


def gaussian_epsilon(
    noise_multiplier: float, sample_rate: float, releases: int, delta: float
) -> float:
    """Epsilon after ``releases`` identical sampled Gaussian releases."""
    rdp = rdp_sampled_gaussian(sample_rate, noise_multiplier) * releases
    return epsilon_from_rdp(rdp, delta)[0]


@dataclass(frozen=True)
class Release:
    """One recorded DP release."""

    release_id: str
    noise_multiplier: float
    sample_rate: float
    epsilon_after: float
    at: str


class PrivacyLedger:
    """Per-model epsilon ledger persisted as JSON at ``path``.

    ``epsilon_budget`` and ``delta`` come from settings and apply to every model; the
    file records the releases, from which epsilon is recomputed on load. One process
    writes a ledger (the trainer); every charge rewrites the file atomically. A file
    that cannot be parsed raises ``ledger-corrupt`` rather than being reset.
    """

    def __init__(self, path: Path, epsilon_budget: float, delta: float) -> None:
        if not (math.isfinite(epsilon_budget) and epsilon_budget > 0):
            raise ValueError(f"epsilon budget must be > 0, got {epsilon_budget}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        self.path = Path(path)
        self.epsilon_budget = float(epsilon_budget)
        self.delta = float(delta)
        self._models: dict[str, list[Release]] = self._load()

    def releases(self, model: str) -> tuple[Release, ...]:
        return tuple(self._models.get(model, ()))

    def spent(self, model: str) -> float:
        """Epsilon spent so far by ``model`` (0.0 before its first release)."""
        return self._epsilon(self.releases(model), ())

    def epsilon_after(
        self, model: str, noise_multiplier: float, sample_rate: float, releases: int = 1
    ) -> float:
        """Epsilon ``model`` would have spent after ``releases`` more such releases."""
        extra = ((noise_multiplier, sample_rate),) * releases
        return self._epsilon(self.releases(model), extra)

    def check(self, model: str, noise_multiplier: float, sample_rate: float) -> float:
        """Epsilon after one more release, or :class:`PrivacyBudgetExceeded`."""
        would_be = self.epsilon_after(model, noise_multiplier, sample_rate)
        if would_be > self.epsilon_budget:
            raise PrivacyBudgetExceeded(
                model, self.spent(model), would_be, self.epsilon_budget, self.delta
            )
        return would_be

    def remaining_releases(
        self, model: str, noise_multiplier: float, sample_rate: float, limit: int = 1_000_000
    ) -> int:
        """How many more such releases fit in the budget (at most ``limit``)."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.epsilon_after(model, noise_multiplier, sample_rate, mid) <= self.epsilon_budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def charge(
        self, model: str, release_id: str, noise_multiplier: float, sample_rate: float
    ) -> float:
        """Record one release (before it is made) and persist; returns epsilon after it.

        Raises :class:`PrivacyBudgetExceeded` (nothing recorded) when it would not fit,
        and :class:`LedgerError` ``duplicate-release`` when ``release_id`` was already
        charged: every release, retries included, needs its own id.
        """
        if any(r.release_id == release_id for r in self.releases(model)):
            raise LedgerError(
                "duplicate-release", f"model {model!r}: release {release_id!r} already charged"
            )
        would_be = self.check(model, noise_multiplier, sample_rate)
        entry = Release(
            release_id=release_id,
            noise_multiplier=float(noise_multiplier),
            sample_rate=float(sample_rate),
            epsilon_after=would_be,
            at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        models = {k: list(v) for k, v in self._models.items()}
        models.setdefault(model, []).append(entry)
        self._save(models)
        self._models = models
        return would_be

    def _epsilon(
        self, recorded: tuple[Release, ...], extra: tuple[tuple[float, float], ...]
    ) -> float:
        counts: dict[tuple[float, float], int] = {}
        for key in [(r.noise_multiplier, r.sample_rate) for r in recorded] + list(extra):
            counts[key] = counts.get(key, 0) + 1
        if not counts:
            return 0.0
        rdp = np.zeros(len(DEFAULT_ORDERS), dtype=np.float64)
        for (z, q), n in counts.items():
            rdp += rdp_sampled_gaussian(q, z) * n
        return epsilon_from_rdp(rdp, self.delta)[0]

    def _load(self) -> dict[str, list[Release]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise LedgerError("ledger-io", f"cannot read {self.path}: {exc}") from exc
        try:
            doc = json.loads(text)
            return _parse(doc)
        except (ValueError, TypeError, KeyError) as exc:
            raise LedgerError("ledger-corrupt", f"{self.path}: {exc}") from exc

    def _save(self, models: dict[str, list[Release]]) -> None:
        doc = {
            "format": LEDGER_FORMAT,
            "models": {m: [asdict(r) for r in rs] for m, rs in sorted(models.items())},
        }
        data = json.dumps(doc, indent=2, sort_keys=True).encode("utf-8")
        try:
            write_atomic(self.path, data, 0o600)
        except OSError as exc:
            raise LedgerError("ledger-io", f"cannot write {self.path}: {exc}") from exc


def _parse(doc: Any) -> dict[str, list[Release]]:
    if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT:
        raise ValueError(f"not a {LEDGER_FORMAT} document")
    models = doc["models"]
    if not isinstance(models, dict):
        raise TypeError("'models' must be an object")
    out: dict[str, list[Release]] = {}
    for name, entries in models.items():
        if not isinstance(entries, list):
            raise TypeError(f"model {name!r}: releases must be a list")
        out[str(name)] = [_parse_release(e) for e in entries]
    return out


def _parse_release(entry: Any) -> Release:
    if not isinstance(entry, dict):
        raise TypeError("a release must be an object")
    z = float(entry["noise_multiplier"])
    q = float(entry["sample_rate"])
    if not (z >= 0.0 and 0.0 <= q <= 1.0):
        raise ValueError(f"release {entry.get('release_id')!r}: bad noise or sample rate")
    return Release(
        release_id=str(entry["release_id"]),
        noise_multiplier=z,
        sample_rate=q,
        epsilon_after=float(entry["epsilon_after"]),
        at=str(entry["at"]),
    )
