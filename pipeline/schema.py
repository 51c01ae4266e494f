"""Stage params as typed frozen dataclasses: one schema per stage config, checked once, when a run is planned.

A stage declares its schema in stages.yaml, ``schema: {params: module:Class, runtime: module:Class}``:
frozen dataclasses whose field annotations are the accepted types and whose ``Annotated`` markers
(:class:`Range`, :class:`Len`, :class:`Pattern`, :class:`Alias`) are the bounds. Nothing else lists
what a stage accepts: ``--set``, ``--config`` files and the manifests' ``params:`` all go through
:class:`StageSchema`.

A field typed with a dataclass is a *section* (``localize.model``): each of its fields is a param of
the stage held under its own name (names are unique across sections), and ``section.field`` names the
same param (``--set localize.model.embed_dim=256`` and ``--set localize.embed_dim=256`` are one key).
A null section field means "not set here" (the stage keeps its preset's or its trained value). A
schema class may define ``check_params(params, upstream)`` for what one field cannot say (a value
against another, a preset merged in, the params of the stages it needs: ``upstream``, stage -> params,
e.g. evaluation's test settings over the training preset they will apply to); it raises ConfigError
naming the param. It may also define
``check_inputs(params, outputs)``: the run's params (files resolved) against what the stages it needs
have already made (``outputs()``: stage -> directory of each complete one), checked before any stage
runs (released weights against a stored feature dimension); it may import what it needs.

Schema modules are imported while planning: they must be import-light (the standard library,
``pipeline.schema`` and ``pipeline.errors``; heavy imports inside functions), and so must their
package's ``__init__``. tests/test_cli_errors.py holds planning to that.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import importlib
import math
import re
import sys
import types
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Mapping, Union, get_args, get_origin, get_type_hints

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Bounds of a number; ``why`` says where an upper bound comes from."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    why: str = ""

    def problem(self, value: Any) -> str | None:
        if not _is_number(value):
            return None
        for bound, fails, text in ((self.ge, value < (self.ge or 0), ">="), (self.gt, value <= (self.gt or 0), ">"),
                                   (self.le, value > (self.le or 0), "<="), (self.lt, value >= (self.lt or 0), "<")):
            if bound is not None and fails:
                why = f" ({self.why})" if self.why and text in ("<=", "<") else ""
                return f"must be {text} {bound:g}{why}, got {value!r}"
        return None


@dataclass(frozen=True)
class Len:
    """How many values a list param holds."""

    min: int = 0
    max: int | None = None

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (list, tuple)):
            return None
        if len(value) < self.min:
            return f"needs at least {self.min} value(s), got {list(value)!r}"
        if self.max is not None and len(value) > self.max:
            return f"takes at most {self.max} values, got {len(value)}"
        return None


@dataclass(frozen=True)
class Pattern:
    """A string param of a form ``text`` describes."""

    regex: str
    text: str

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) and not re.fullmatch(self.regex, value):
            return f"expected {self.text}, got {value!r}"
        return None


@dataclass(frozen=True)
class Alias:
    """Other names a param is known by elsewhere (the official configs' spelling)."""

    names: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        return None


@dataclass(frozen=True)
class SplitName:
    """A key of the dataset's ``splits``: the runner checks it against the manifest of the run."""

    def problem(self, value: Any) -> str | None:
        return None


# what two domains share: the device and thread settings of their runtime
Device = Annotated[str, Pattern(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N")]
Threads = Annotated[int, Range(ge=1, le=1024, why="torch intra-op threads")]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strip(hint: Any) -> Any:
    return get_args(hint)[0] if get_origin(hint) is Annotated else hint


def describe(hint: Any) -> str:
    hint = _strip(hint)
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in get_args(hint))
    if origin is Literal:
        return " | ".join(str(a) for a in get_args(hint))
    if origin in (tuple, list, collections.abc.Sequence):
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({describe(args[0])})"
        return f"a list of {len(args)} values" if args else "a list"
    if origin in (dict, collections.abc.Mapping) or dataclasses.is_dataclass(hint):
        return "a mapping"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a finite number",
            str: "a string", Any: "any value"}.get(hint, getattr(hint, "__name__", str(hint)))


def problem(hint: Any, value: Any) -> str | None:
    """Why ``value`` is not a ``hint`` (types, bounds, finiteness), or None when it is."""
    if get_origin(hint) is Annotated:
        base, *marks = get_args(hint)
        return problem(base, value) or next((p for m in marks if (p := m.problem(value))), None)
    origin = get_origin(hint)
    if hint is Any:
        return None
    if origin in (Union, types.UnionType):
        alternatives = get_args(hint)
        problems = [problem(a, value) for a in alternatives]
        if None in problems:
            return None
        for a, p in zip(alternatives, problems):  # of the right kind but out of bounds: say why
            if _kind(_strip(a), value):
                return p
        return f"expected {describe(hint)}, got {value!r}"
    if origin is Literal:
        ok = any(value == a and type(value) is type(a) for a in get_args(hint))
        return None if ok else f"expected {describe(hint)}, got {value!r}"
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return f"expected {describe(hint)}, got {value!r}"
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif args and len(args) != len(value):
            return f"expected {describe(hint)}, got {list(value)!r}"
        for i, (a, v) in enumerate(zip(args, value)):
            if p := problem(a, v):
                return f"[{i}]: {p}"
        return None
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            return f"expected a mapping, got {value!r}"
        args = get_args(hint)
        for k, v in value.items():
            if args and (p := problem(args[0], k) or problem(args[1], v)):
                return f"{k}: {p}"
        return None
    if dataclasses.is_dataclass(hint):
        return None if isinstance(value, hint) else f"expected a mapping, got {value!r}"
    if hint is type(None):
        return None if value is None else f"expected null, got {value!r}"
    if hint is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"expected an integer, got {value!r}"
    if hint is float:
        if not _is_number(value):
            return f"expected a number, got {value!r}"
        return None if math.isfinite(value) else f"must be finite, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    return None if isinstance(value, hint) else f"expected {describe(hint)}, got {value!r}"


@functools.lru_cache(maxsize=None)
def hints(cls: type) -> dict[str, Any]:
    """Field name -> annotation (markers kept) of a dataclass (evaluated once: planning pays for it)."""
    return get_type_hints(cls, include_extras=True)


def apply(base: Any, params: Mapping[str, Any]) -> Any:
    """``base`` (a schema dataclass instance, e.g. a preset) with the stage's flat ``params`` set on the
    section that holds each name; a null or absent one keeps ``base``'s value; lists become tuples."""
    changes = {}
    for name, hint in hints(type(base)).items():
        value = getattr(base, name)
        if dataclasses.is_dataclass(_strip(hint)):
            if (section := apply(value, params)) is not value:
                changes[name] = section
        elif params.get(name) is not None:
            changes[name] = frozen(params[name])
    return dataclasses.replace(base, **changes) if changes else base


def frozen(value: Any) -> Any:
    """JSON/YAML lists -> tuples, as frozen dataclasses hold them (hashable, comparable)."""
    return tuple(frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def build(cls: type, values: Mapping[str, Any], where: str, unknown: str = "unknown parameter") -> Any:
    """An instance of the schema dataclass ``cls`` from a flat mapping (null: the field's default), every
    value checked against its annotation; errors name ``where.field``."""
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(values) - known)
    if extra:
        raise ConfigError(f"{where}.{extra[0]}: {unknown}; known: {', '.join(sorted(known))}")
    kinds = hints(cls)
    for name, value in values.items():
        if value is not None and (p := problem(kinds[name], value)):
            raise ConfigError(f"{where}.{name}: {p}")
    return cls(**{name: frozen(v) for name, v in values.items() if v is not None})


def check_instance(obj: Any, where: str) -> None:
    """Every field of a (frozen) dataclass instance against its annotation; sections recursively."""
    for name, hint in hints(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(_strip(hint)) and dataclasses.is_dataclass(value):
            check_instance(value, where)
        elif p := problem(hint, value):
            raise ConfigError(f"{where}.{name}: {p}")


@dataclass(frozen=True)
class Param:
    key: str                    # the name params / runtime hold it under
    hint: Any
    runtime: bool
    section: str | None = None  # the section dataclass field it belongs to


class StageSchema:
    """The params and runtime values one stage accepts, from its schema classes."""

    def __init__(self, stage: str, params_cls: type | None, runtime_cls: type | None):
        self.stage = stage
        self.params_cls = params_cls
        self.names: dict[str, Param] = {}  # every accepted spelling: key, section.key, aliases
        self.sections: set[str] = set()
        for cls, runtime in ((params_cls, False), (runtime_cls, True)):
            if cls is not None:
                self._add_fields(cls, runtime, ())

    def _add_fields(self, cls: type, runtime: bool, section: tuple[str, ...]) -> None:
        for name, hint in hints(cls).items():
            path = ".".join((*section, name))
            if dataclasses.is_dataclass(_strip(hint)):  # a section (sections nest)
                self.sections.add(path)
                self._add_fields(_strip(hint), runtime, (*section, name))
                continue
            # in a section, null means "not set here"
            self._add(name, Param(name, hint | None if section else hint, runtime, ".".join(section) or None), hint)
            self.names[path] = self.names[name]

    def _add(self, name: str, param: Param, hint: Any) -> None:
        if name in self.names:
            raise ConfigError(f"{self.stage}: schema field {name!r} is declared twice (names are unique "
                              f"across sections)")
        self.names[name] = param
        for mark in get_args(hint)[1:] if get_origin(hint) is Annotated else ():
            if isinstance(mark, Alias):
                self.names.update({alias: param for alias in mark.names})
                self.names.update({f"{param.section}.{alias}": param for alias in mark.names if param.section})

    def expand(self, path: tuple[str, ...], value: Any) -> list[tuple[tuple[str, ...], Any]]:
        """A section given as a mapping (``model: {embed_dim: 256}``) -> one (path, value) per field."""
        if ".".join(path) in self.sections and isinstance(value, Mapping):
            return [leaf for k, v in value.items() for leaf in self.expand((*path, str(k)), v)]
        return [(path, value)]

    def locate(self, path: tuple[str, ...]) -> tuple[Param, tuple[str, ...]]:
        """The param a dotted path names, and the rest of the path (keys inside a mapping param)."""
        for n in range(len(path), 0, -1):
            param = self.names.get(".".join(path[:n]))
            # a name that is both a section and a param (localize.model): a longer path is in the section
            if param is not None and not (n < len(path) and ".".join(path[:n]) in self.sections):
                if n < len(path) and not _is_mapping(param.hint):
                    raise ConfigError(f"{self.stage}.{param.key} is not a mapping; set it whole")
                return param, path[n:]
        dotted = ".".join(path)
        near = difflib.get_close_matches(dotted, list(self.names), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(f'{self.stage}.{m}' for m in near)}?" if near else ""
        raise ConfigError(f"unknown param {self.stage}.{dotted}{hint}")

    def marked(self, kind: type) -> list[Param]:
        """The params whose annotation carries a marker of type ``kind``."""
        return [p for name, p in self.names.items() if name == p.key and get_origin(p.hint) is Annotated
                and any(isinstance(m, kind) for m in get_args(p.hint)[1:])]

    def check(self, param: Param, value: Any, where: str) -> None:
        if p := problem(param.hint, value):
            raise ConfigError(f"{where}: {p}")

    def check_params(self, params: Mapping[str, Any], upstream: Mapping[str, Mapping[str, Any]]) -> None:
        hook = getattr(self.params_cls, "check_params", None)
        if hook is not None:
            hook(params, upstream)

    @property
    def checks_inputs(self) -> bool:
        return hasattr(self.params_cls, "check_inputs")

    def check_inputs(self, params: Mapping[str, Any], outputs: Callable[[], Mapping[str, Any]]) -> None:
        if self.checks_inputs:
            self.params_cls.check_inputs(params, outputs)


def _kind(hint: Any, value: Any) -> bool:
    """Whether ``value`` is of the kind ``hint`` takes (a number for float, a list for a tuple ...)."""
    origin = get_origin(hint)
    if origin in (tuple, list, collections.abc.Sequence):
        return isinstance(value, (list, tuple))
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        return isinstance(value, Mapping)
    if hint is float:
        return _is_number(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return False  # a literal, a string, null: the whole union says what is expected


def _is_mapping(hint: Any) -> bool:
    hint = _strip(hint)
    if get_origin(hint) in (Union, types.UnionType):
        return any(_is_mapping(a) for a in get_args(hint))
    return get_origin(hint) in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping)


def load_class(target: str, root: str, where: str) -> type:
    """``module:Class`` of a schema, imported (schema modules are import-light; see the module doc)."""
    module, _, name = target.partition(":")
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        cls = getattr(importlib.import_module(module), name)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{where}: cannot import {target}: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"{where}: {target} is not a dataclass")
    return cls
