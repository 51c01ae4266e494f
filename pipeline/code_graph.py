"""The source files a stage's output depends on: the modules of its ``code`` packages that its entry
function can reach through imports, so that editing a plot or a CLI verb of the same package does not
change the stage's key (and retrain), while editing anything the entry can run does.

Reached means: the imports of the entry module's top level and of the entry function, with the module's
functions and classes the entry names, transitively (parsed with ``ast``: one file); then every import,
at any depth, of each reached module (scanned as text: fast on every command, and a false hit only
adds a file). Registries that import by string (``"extractors.i3d:build"``) are followed through
quoted dotted names that start with a code package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+([.\w]+)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]*)|import[ \t]+([^\n#]*))", re.M)


def reachable_modules(entry: str, packages: dict[str, Path]) -> dict[str, Path]:
    """``module name -> file`` of every module of ``packages`` (dotted name -> package directory or
    module file) that ``entry`` (``module:function``) can import, the entry module and the packages'
    ``__init__`` files on the way included."""
    module, function = entry.split(":")
    found: dict[str, Path] = {}
    queue: list[str] = []

    def visit(name: str) -> None:
        for prefix in _prefixes(name):
            if prefix not in found and (path := _module_file(prefix, packages)) is not None:
                found[prefix] = path
                queue.append(prefix)

    visit(module)
    entry_file = found.get(module)
    if entry_file is None:
        return found
    queue.remove(module)
    for name in _entry_imports(entry_file, module, function):
        visit(name)
    for name in _string_refs(entry_file.read_text(encoding="utf-8"), packages):
        visit(name)
    while queue:
        name = queue.pop()
        path = found[name]
        text = path.read_text(encoding="utf-8")
        for target in _text_imports(text, name, path.name == "__init__.py") + _string_refs(text, packages):
            visit(target)
    return dict(sorted(found.items()))


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _module_file(name: str, packages: dict[str, Path]) -> Path | None:
    """The file of module ``name`` when it lies in one of ``packages`` (a package's directory, or a
    single module's file: ``pipeline.trainer`` brings that module only)."""
    for root_name, root in packages.items():
        if root.is_file():
            if name == root_name:
                return root
            continue
        if name != root_name and not name.startswith(root_name + "."):
            continue
        rest = name[len(root_name) + 1:]
        base = root.joinpath(*rest.split(".")) if rest else root
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                return candidate
    return None


def _resolve(module: str | None, level: int, current: str, is_package: bool) -> str:
    """The absolute name of ``from <.level module> import ...`` written in module ``current``."""
    if not level:
        return module or ""
    parts = current.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _text_imports(text: str, current: str, is_package: bool) -> list[str]:
    names: list[str] = []
    for source, imported, plain in _IMPORT.findall(text):
        if plain:
            names += [part.split(" as ")[0].strip() for part in plain.split(",")]
            continue
        dots = len(source) - len(source.lstrip("."))
        base = _resolve(source.lstrip(".") or None, dots, current, is_package)
        names.append(base)
        # ``from pkg import mod``: mod may be a submodule; a name that is not one resolves to nothing
        for part in imported.strip("()").replace("\n", " ").split(","):
            part = part.split(" as ")[0].strip()
            if part and part != "*":
                names.append(f"{base}.{part}")
    return [n for n in names if n]


def _string_refs(text: str, packages: dict[str, Path]) -> list[str]:
    tops = "|".join(re.escape(p.split(".")[0]) for p in packages)
    return [m for m in re.findall(rf"[\"']((?:{tops})(?:\.\w+)+)(?::\w+)?[\"']", text)] if tops else []


def _entry_imports(path: Path, module: str, function: str) -> list[str]:
    """Imports of the module's top level and of the definitions ``function`` reaches by name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    definitions = {node.name: node for node in tree.body
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    nodes: list[ast.AST] = [node for node in tree.body if node not in definitions.values()]
    seen = set()
    todo = [function] + [n.id for root in nodes for n in ast.walk(root) if isinstance(n, ast.Name)]
    while todo:
        name = todo.pop()
        if name in seen or name not in definitions:
            continue
        seen.add(name)
        nodes.append(definitions[name])
        todo += [n.id for n in ast.walk(definitions[name]) if isinstance(n, ast.Name)]
    names: list[str] = []
    for root in nodes:
        for node in ast.walk(root):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module, node.level, module, is_package)
                names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return [n for n in names if n]
