"""stages.yaml -> frozen stage specs, validated once: every error names the file, the stage and the field.

Entries are checked without importing them: the module file is located with ``PathFinder`` level by
level and parsed with ``ast``, so planning never pays for torch or a domain package.
"""

from __future__ import annotations

import ast
import functools
import importlib.machinery
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import ConfigError
from pipeline.schema import StageSchema, load_class

STAGE_FIELDS = ("entry", "needs", "code", "version", "per_item", "tasks", "file_params", "commands",
                "schema", "params", "runtime")
SCHEMA_FIELDS = ("params", "runtime")
TOP_FIELDS = ("stages",)
CACHE_ROOT_NAMES = ("datasets", "imports", "experiments", "tensorboard", "keyframes")
# What a per-item stage maps over: the dataset's video files, or the keyframes of its splits (a detect
# dataset), each keyframe an item of its own whose source is its video file.
PER_ITEM_KINDS = ("videos", "keyframes")


@dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str
    needs: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    version: int | None = None
    per_item: str = ""      # "" (a whole stage) | "videos" | "keyframes": the items it maps over
    tasks: tuple[str, ...] = ()
    file_params: tuple[str, ...] = ()
    commands: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    runtime: Mapping[str, Any] = field(default_factory=dict)
    schema: Mapping[str, str] = field(default_factory=dict)  # params / runtime -> 'module:Class'


@dataclass(frozen=True)
class StageGraph:
    path: Path
    stages: Mapping[str, StageSpec]
    order: tuple[str, ...]  # topological: every stage after the stages it needs

    @property
    def root(self) -> Path:
        """The project the stage file belongs to: entries and code packages are looked up here first."""
        return self.path.parent

    def __getitem__(self, name: str) -> StageSpec:
        try:
            return self.stages[name]
        except KeyError:
            raise ConfigError(f"unknown stage {name!r}; known: {', '.join(self.order)}") from None

    def closure(self, targets) -> list[str]:
        """The targets and everything they need, in topological order."""
        wanted: set[str] = set()
        stack = list(targets)
        while stack:
            name = stack.pop()
            if name not in wanted:
                wanted.add(name)
                stack.extend(self[name].needs)
        return [n for n in self.order if n in wanted]

    def for_task(self, task: str) -> list[str]:
        """Stages whose ``tasks`` include ``task`` (a stage without ``tasks`` serves every task)."""
        return [n for n in self.order if not self.stages[n].tasks or task in self.stages[n].tasks]

    def search_path(self) -> list[str]:
        root = str(self.root)
        return [root] + [p for p in sys.path if p != root]

    def check_entry(self, name: str) -> None:
        """Fail (exit 2) if the stage's entry cannot be imported, without importing it."""
        _check_target(self, name, "entry", self[name].entry)

    def schema(self, name: str) -> StageSchema | None:
        """The stage's declared schema (None: it accepts the keys its stages.yaml defaults list)."""
        spec = self[name]
        if not spec.schema:
            return None
        return _load_schema(str(self.root), f"{self.path}: stages.{name}.schema", name,
                            spec.schema.get("params"), spec.schema.get("runtime"))

    def check_command(self, name: str, verb: str) -> None:
        _check_target(self, name, f"commands.{verb}", self[name].commands[verb])

    def locate_package(self, name: str, package: str) -> Path:
        """The directory (or file) of a ``code`` package, located without importing it."""
        origin = locate_module(package, self.search_path())
        if origin is None:
            raise ConfigError(f"{self.path}: stages.{name}.code: package {package!r} not found")
        return origin.parent if origin.name == "__init__.py" else origin


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` through libyaml when it is there (several times faster on every command), with
    ``2e-4`` read as the number it is (YAML 1.2; PyYAML's 1.1 rules want ``2.0e-4`` and give a string)."""
    import yaml

    return yaml.load(text, Loader=_loader())


@functools.lru_cache(maxsize=None)
def _loader():
    import re

    import yaml

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def load_stage_graph(path: str | Path) -> StageGraph:
    import yaml

    path = Path(path).resolve()
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: stage file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), dict) or not raw["stages"]:
        raise ConfigError(f"{path}: stages: expected a mapping of stage name -> fields")
    for key in raw:
        if key not in TOP_FIELDS:
            raise ConfigError(f"{path}: {key}: unknown top-level key; known: {', '.join(TOP_FIELDS)}")
    stages = {name: _parse_stage(path, str(name), fields) for name, fields in raw["stages"].items()}
    for spec in stages.values():
        for need in spec.needs:
            if need not in stages:
                raise ConfigError(f"{path}: stages.{spec.name}.needs: unknown stage {need!r}; "
                                  f"known: {', '.join(stages)}")
    return StageGraph(path=path, stages=stages, order=_topological(path, stages))


def _parse_stage(path: Path, name: str, fields: Any) -> StageSpec:
    where = f"{path}: stages.{name}"
    # identifiers only: `--set stage.param=v` splits on dots; datasets/imports are cache-root folders
    if not name.isidentifier() or name in CACHE_ROOT_NAMES:
        raise ConfigError(f"{where}: bad stage name (a Python identifier other than "
                          f"{', '.join(CACHE_ROOT_NAMES)})")
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: expected a mapping of fields")
    for key in fields:
        if key not in STAGE_FIELDS:
            raise ConfigError(f"{where}.{key}: unknown field; known: {', '.join(STAGE_FIELDS)}")
    if "entry" not in fields:
        raise ConfigError(f"{where}.entry: missing (expected 'module:function')")
    entry = _target(f"{where}.entry", fields["entry"])

    def names(key: str) -> tuple[str, ...]:
        value = fields.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}.{key}: expected a list of names, got {value!r}")
        return tuple(value)

    def mapping(key: str) -> dict:
        value = fields.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}.{key}: expected a mapping, got {value!r}")
        return value

    version = fields.get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise ConfigError(f"{where}.version: expected an integer, got {version!r}")
    per_item = fields.get("per_item", False)
    if per_item not in (False, True) + PER_ITEM_KINDS:
        raise ConfigError(f"{where}.per_item: expected false, true (videos) or one of {', '.join(PER_ITEM_KINDS)}, "
                          f"got {per_item!r}")
    per_item = "videos" if per_item is True else per_item or ""
    params, runtime = mapping("params"), mapping("runtime")
    both = sorted(set(params) & set(runtime))
    if both:
        raise ConfigError(f"{where}.runtime: {', '.join(both)} also in params (a value is one or the other)")
    file_params = names("file_params")
    for p in file_params:
        if p not in params:
            raise ConfigError(f"{where}.file_params: {p!r} is not a param of the stage")
    commands = {verb: _target(f"{where}.commands.{verb}", t) for verb, t in mapping("commands").items()}
    schema = mapping("schema")
    for key, target in schema.items():
        if key not in SCHEMA_FIELDS:
            raise ConfigError(f"{where}.schema.{key}: unknown field; known: {', '.join(SCHEMA_FIELDS)}")
        _target(f"{where}.schema.{key}", target)
    return StageSpec(name=name, entry=entry, needs=names("needs"), code=names("code"), version=version,
                     per_item=per_item, tasks=names("tasks"), file_params=file_params, commands=commands,
                     params=params, runtime=runtime, schema=schema)


@functools.lru_cache(maxsize=None)
def _load_schema(root: str, where: str, stage: str, params: str | None, runtime: str | None) -> StageSchema:
    return StageSchema(stage, *(load_class(t, root, f"{where}.{k}") if t else None
                                for k, t in (("params", params), ("runtime", runtime))))


def _target(where: str, value: Any) -> str:
    module, _, fn = str(value).partition(":") if isinstance(value, str) else ("", "", "")
    if not module or not fn or not all(p.isidentifier() for p in module.split(".")) or not fn.isidentifier():
        raise ConfigError(f"{where}: expected 'module:function', got {value!r}")
    return value


def _topological(path: Path, stages: Mapping[str, StageSpec]) -> tuple[str, ...]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = trail[trail.index(name):] + [name]
            raise ConfigError(f"{path}: stages.{name}.needs: cycle {' -> '.join(cycle)}")
        state[name] = 1
        for need in stages[name].needs:
            visit(need, trail + [name])
        state[name] = 2
        order.append(name)

    for name in stages:
        visit(name, [])
    return tuple(order)


def locate_module(dotted: str, search_path: list[str]) -> Path | None:
    """The file of a module (``__init__.py`` for a package), found level by level without importing."""
    locations: list[str] | None = search_path
    origin = None
    for i, part in enumerate(dotted.split(".")):
        name = ".".join(dotted.split(".")[: i + 1])
        spec = importlib.machinery.PathFinder.find_spec(name, locations)
        if spec is None:
            return None
        origin = spec.origin if spec.has_location else None
        locations = list(spec.submodule_search_locations or [])
        if origin is None and locations:  # namespace package: no __init__.py
            origin = str(Path(locations[0]) / "__init__.py")
    return Path(origin) if origin else None


def _check_target(graph: StageGraph, stage: str, field_name: str, target: str) -> None:
    where = f"{graph.path}: stages.{stage}.{field_name}"
    module, fn = target.split(":")
    origin = locate_module(module, graph.search_path())
    if origin is None or not origin.is_file() or origin.suffix != ".py":
        raise ConfigError(f"{where}: module {module!r} not found")
    try:
        tree = ast.parse(origin.read_bytes(), filename=str(origin))
    except SyntaxError as exc:
        raise ConfigError(f"{where}: {origin}:{exc.lineno}: syntax error: {exc.msg}") from None
    if fn not in _top_level_names(tree):
        raise ConfigError(f"{where}: {origin} defines no top-level {fn!r}")


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names
