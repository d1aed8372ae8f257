"""The models fedgate knows: built-ins, entry points, and ``module:attribute`` references.

A model reference (each service's ``MODELS`` setting, ``fedgate up --model``) is one of:

- a built-in's name (``digits``);
- the name of an entry point in the group :data:`ENTRY_POINT_GROUP` (``fedgate.models``)
  of any installed package, whose object is a :class:`~fedcore.spec.ModelSpec`;
- ``package.module:ATTRIBUTE``, a spec importable from the service's Python path.

:func:`use_models` resolves references, checks each spec (``fedcore.spec_check``) and
registers it under its name, so the rest of the process asks :func:`get_spec` by name.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from importlib.metadata import entry_points

from fedcore.errors import ModelSpecError
from fedcore.models.diabetes import DIABETES
from fedcore.models.digits import DIGITS
from fedcore.models.digits_conv import DIGITS_CONV
from fedcore.models.wide import HIDDEN_VAR, WIDE
from fedcore.spec import ModelSpec

ENTRY_POINT_GROUP = "fedgate.models"
BUILTINS: dict[str, ModelSpec] = {s.name: s for s in (DIGITS, DIABETES, DIGITS_CONV, WIDE)}
REGISTRY: dict[str, ModelSpec] = dict(BUILTINS)
"""Every model this process resolved, by name (the built-ins from the start)."""
_REFS: dict[str, str] = {name: name for name in BUILTINS}
MODEL_VARS = frozenset({HIDDEN_VAR})
"""Environment variables built-in models read (every service of a stack gets them)."""
_OBJECT_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _entry_point(name: str) -> ModelSpec | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return _as_spec(ep.load(), f"entry point {name!r} ({ep.value})")
    return None


def _as_spec(obj: object, where: str) -> ModelSpec:
    if not isinstance(obj, ModelSpec):
        raise ModelSpecError(f"{where} is a {type(obj).__name__}, not a fedcore.spec.ModelSpec")
    return obj


def resolve(ref: str) -> ModelSpec:
    """The spec a reference names (not registered, not checked beyond its own fields)."""
    if ref in BUILTINS:
        return BUILTINS[ref]
    try:
        if _OBJECT_REF.match(ref):
            module_name, attribute = ref.split(":")
            module = importlib.import_module(module_name)
            if not hasattr(module, attribute):
                raise ModelSpecError(f"module {module_name!r} has no attribute {attribute!r}")
            return _as_spec(getattr(module, attribute), ref)
        found = _entry_point(ref)
    except ModelSpecError as exc:
        raise ModelSpecError(f"model spec {ref!r}: {exc}") from None
    except ImportError as exc:
        raise ModelSpecError(f"model spec {ref!r}: cannot import: {exc}") from None
    if found is None:
        raise ModelSpecError(
            f"model spec {ref!r}: unknown; give a built-in ({', '.join(sorted(BUILTINS))}), "
            f"an entry point of group {ENTRY_POINT_GROUP!r} or package.module:ATTRIBUTE"
        )
    return found


def use_models(refs: Sequence[str], *, deep: bool = True) -> list[str]:
    """Resolve, check and register ``refs``; their model names, in order.

    ``deep`` also builds each module and checks it against the spec on a dummy batch, and
    loads its initial weights and evaluation set (needs torch). Raises ModelSpecError
    naming the reference, the field and the problem.
    """
    from fedcore.spec_check import check_spec

    names: list[str] = []
    for ref in refs:
        spec = resolve(ref)
        if spec.name in names:
            raise ModelSpecError(f"model spec {ref!r}: model name {spec.name!r} given twice")
        known = REGISTRY.get(spec.name)
        if known is not None and known is not spec:
            raise ModelSpecError(
                f"model spec {ref!r}: name {spec.name!r} is already taken by "
                f"{_REFS.get(spec.name, spec.name)!r}"
            )
        if deep:
            try:
                check_spec(spec)
            except ModelSpecError as exc:
                raise ModelSpecError(f"model spec {ref!r}: {exc}") from None
        register(spec, ref)
        names.append(spec.name)
    return names


def register(spec: ModelSpec, ref: str) -> None:
    """Make ``spec`` known by name in this process (``ref``: where it came from)."""
    REGISTRY[spec.name] = spec
    _REFS[spec.name] = ref


def models_setting(refs: list[str], *, deep: bool) -> list[str]:
    """A service's ``MODELS`` setting as model names (a ValueError for pydantic otherwise)."""
    if not refs:
        raise ValueError("name at least one model")
    try:
        return use_models(refs, deep=deep)
    except ModelSpecError as exc:
        raise ValueError(str(exc)) from None


def ref_of(name: str) -> str:
    """The reference model ``name`` was resolved from (for a child process to resolve it)."""
    return _REFS.get(name, name)


def get_spec(name: str) -> ModelSpec:
    """The spec of model ``name`` (registered, or an entry point); a clear error otherwise."""
    spec = REGISTRY.get(name)
    if spec is None:
        try:
            spec = _entry_point(name)
        except (ImportError, ModelSpecError):
            spec = None
        if spec is None or spec.name != name:
            raise ModelSpecError(f"unknown model {name!r}; known: {sorted(REGISTRY)}") from None
        REGISTRY[name] = spec
    return spec
