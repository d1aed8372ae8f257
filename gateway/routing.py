"""Which version and which edge serve a request.

A request that names a version goes to an edge serving that version. A request that does
not is routed by the model's :class:`TrafficSplit` when one is set (rollouts set it:
``candidate_weight`` of the unversioned traffic to the candidate, the rest to the stable
version), else to the newest version any admitted edge serves, which is what Triton itself
would pick. Either way the upstream request names the version, so the response header that
reports it is always true.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.errors import GatewayError, NotFound, Unavailable
from gateway.fleet import Edge, Fleet


class TrafficSplit(BaseModel):
    """A model's unversioned traffic: ``candidate_weight`` to ``candidate``, rest to ``stable``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stable: int = Field(ge=1, description="version that serves the rest of the traffic")
    candidate: int | None = Field(default=None, ge=1, description="version under trial")
    candidate_weight: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of unversioned requests to the candidate"
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrafficSplit:
        if self.candidate is None and self.candidate_weight > 0:
            raise ValueError("candidate_weight > 0 needs a candidate version")
        if self.candidate is not None and self.candidate == self.stable:
            raise ValueError("candidate must differ from stable")
        return self

    def pick(self, draw: float) -> int:
        """The version for a uniform ``draw`` in [0, 1)."""
        if self.candidate is not None and draw < self.candidate_weight:
            return self.candidate
        return self.stable

    def other(self, version: int) -> int | None:
        """The split's other version, the fallback when ``version`` has no edge."""
        if version == self.stable:
            return self.candidate
        return self.stable


def parse_version(raw: str | None) -> int | None:
    """A version path segment as an int; 404 in Triton's words when it is not one."""
    if raw is None:
        return None
    if not raw.isdigit() or not raw.isascii() or len(raw) > 18:  # no int() of 5,000 digits
        raise NotFound(f"Request for unknown model: version {raw!r} is not a positive integer")
    return int(raw)


@dataclass
class Router:
    """Traffic splits per model, and the choice of version and edge per request."""

    fleet: Fleet
    draw: Callable[[], float] = random.random
    splits: dict[str, TrafficSplit] = field(default_factory=dict)

    def set_split(self, model: str, split: TrafficSplit | None) -> None:
        """Set (or with None clear) the split of ``model``'s unversioned traffic."""
        if split is None:
            self.splits.pop(model, None)
        else:
            self.splits[model] = split

    def default_version(self, model: str) -> int | None:
        """The version unversioned requests of ``model`` go to without a split."""
        versions = self.fleet.versions(model)
        return versions[-1] if versions else None

    def not_served(self, model: str, version: int | None) -> Exception:
        """404 for an unknown model or version, 503 when it exists but no edge can serve it."""
        if not self.fleet.knows(model):
            return NotFound(f"Request for unknown model: '{model}' is not found")
        if version is not None and not self.fleet.serving(model, version, admitted=False):
            return NotFound(f"Request for unknown model: '{model}' version {version} is not found")
        which = f"model '{model}'" + (f" version {version}" if version is not None else "")
        return Unavailable(f"no ready edge serves {which}")

    def route(
        self,
        model: str,
        version: int | None,
        exclude: Sequence[str] = (),
        prefer: str | None = None,
    ) -> tuple[Edge, int]:
        """Edge and version for one request; raises :class:`NotFound` or :class:`Unavailable`.

        ``prefer`` names an edge to use when it can serve the request (a site's clients
        sending to their local edge); otherwise routing goes on as if it were not given.
        """
        if prefer is not None and prefer in self.fleet.edges and prefer not in exclude:
            others = [e for e in self.fleet.edges if e != prefer]
            try:
                return self.route(model, version, [*exclude, *others])
            except GatewayError:
                pass
        if version is not None:
            edge = self.fleet.choose(model, version, exclude)
            if edge is None:
                raise self.not_served(model, version)
            return edge, version
        split = self.splits.get(model)
        if split is None:
            found = self.fleet.choose_newest(model, exclude)
            if found is None:
                raise self.not_served(model, self.default_version(model))
            return found
        picked = split.pick(self.draw())
        edge = self.fleet.choose(model, picked, exclude)
        fallback = split.other(picked)
        if edge is None and fallback is not None:
            picked, edge = fallback, self.fleet.choose(model, fallback, exclude)
        if edge is None:
            raise self.not_served(model, None)
        return edge, picked
