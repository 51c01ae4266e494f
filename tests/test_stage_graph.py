"""stages.yaml loading and validation, param resolution (defaults <- manifest <- --set)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.datasets import Dataset
from pipeline.errors import ConfigError
from pipeline.runner import parse_sets, resolve_params
from pipeline.stage_graph import load_stage_graph

PROJECT = Path(__file__).resolve().parent.parent

GOOD = """\
stages:
  a:
    entry: mod:fa
    per_item: true
    params: {x: 1, model: {dim: 8, depth: 2}}
    runtime: {workers: 0}
  b:
    entry: mod:fb
    needs: [a]
    params: {y: 2}
"""


def write(tmp_path: Path, text: str, module: str = "def fa(ctx):\n    pass\n\nfb = fa\n") -> Path:
    (tmp_path / "mod.py").write_text(module)
    p = tmp_path / "stages.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_project_stages_load_in_topological_order():
    graph = load_stage_graph(PROJECT / "stages.yaml")
    order = list(graph.order)
    for name, spec in graph.stages.items():
        for need in spec.needs:
            assert order.index(need) < order.index(name)
    assert graph["extract"].per_item and graph["extract"].version == 1
    assert graph.closure(["localize_eval"]) == ["extract", "localize", "localize_eval"]


def test_entries_are_checked_without_importing(tmp_path):
    graph = load_stage_graph(write(tmp_path, GOOD))
    graph.check_entry("a")
    graph.check_entry("b")  # an assignment at top level defines the name too
    import sys

    assert "mod" not in sys.modules


@pytest.mark.parametrize("text,field", [
    (GOOD.replace("per_item: true", "per_item: true\n    colour: red"), "stages.a.colour: unknown field"),
    (GOOD.replace("entry: mod:fb", "code: [mod]"), "stages.b.entry: missing"),
    (GOOD.replace("entry: mod:fb", "entry: mod.fb"), "stages.b.entry: expected 'module:function'"),
    (GOOD.replace("needs: [a]", "needs: [z]"), "stages.b.needs: unknown stage 'z'"),
    (GOOD.replace("    per_item: true", "    needs: [b]\n    per_item: true"), "needs: cycle"),
    (GOOD.replace("per_item: true", "per_item: yes please"), "stages.a.per_item: expected false, true (videos) or one of videos, keyframes"),
    (GOOD.replace("params: {y: 2}", "params: {y: 2}\n    version: one"), "stages.b.version: expected an integer"),
    (GOOD.replace("params: {y: 2}", "params: {y: 2}\n    file_params: [w]"), "stages.b.file_params: 'w'"),
    (GOOD.replace("runtime: {workers: 0}", "runtime: {x: 0}"), "stages.a.runtime: x also in params"),
    ("stage:\n  a: {entry: 'mod:fa'}\n", "stages: expected a mapping"),
    (GOOD + "extra: 1\n", "extra: unknown top-level key"),
    (GOOD.replace("  b:", "  b.c:"), "stages.b.c: bad stage name"),
    (GOOD.replace("needs: [a]", "needs: [a"), "invalid YAML"),
])
def test_bad_stage_files_name_the_file_stage_and_field(tmp_path, text, field):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_stage_graph(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and field in message and "\n" not in message


@pytest.mark.parametrize("module,field", [
    ("def other(ctx):\n    pass\n", "stages.a.entry: "),
    ("def fa(ctx:\n", "stages.a.entry: "),
])
def test_entry_that_does_not_import_is_reported(tmp_path, module, field):
    graph = load_stage_graph(write(tmp_path, GOOD, module=module))
    with pytest.raises(ConfigError) as err:
        graph.check_entry("a")
    assert str(err.value).startswith(f"{tmp_path / 'stages.yaml'}: {field}")


def test_missing_entry_module_is_reported(tmp_path):
    graph = load_stage_graph(write(tmp_path, GOOD.replace("mod:fa", "nosuchmod.sub:fa")))
    with pytest.raises(ConfigError, match=r"stages\.a\.entry: module 'nosuchmod\.sub' not found"):
        graph.check_entry("a")


def dataset(params: dict) -> Dataset:
    return Dataset(name="d", task="localize", path=Path("/data/d.yaml"), root=Path("/data"), videos=None,
                   annotations=None, splits={}, params=params)


def test_params_resolve_defaults_then_manifest_then_set(tmp_path):
    graph = load_stage_graph(write(tmp_path, GOOD))
    ds = dataset({"a": {"x": 5, "model": {"dim": 16}}})
    sets = parse_sets(["a.model.depth=4", "a.workers=3", "b.y=[1, 2]"])
    resolved = resolve_params(graph, ds, sets)
    assert resolved["a"] == ({"x": 5, "model": {"dim": 16, "depth": 4}}, {"workers": 3})
    assert resolved["b"] == ({"y": [1, 2]}, {})
    assert graph["a"].params["model"] == {"dim": 8, "depth": 2}  # defaults are never aliased


@pytest.mark.parametrize("sets,manifest,message", [
    (["z.x=1"], {}, "--set z.x=1: unknown stage 'z'; known: a, b"),
    (["a.nope=1"], {}, "--set a.nope=1: unknown param a.nope; known: x, model, workers"),
    (["a.x.deep=1"], {}, "--set a.x.deep=1: a.x is not a mapping"),
    (["a.x"], {}, "--set a.x: expected stage.param=value"),
    ([], {"q": {"x": 1}}, "/data/d.yaml: params.q: unknown stage"),
    ([], {"b": {"zz": 1}}, "/data/d.yaml: params.b.zz: unknown param b.zz; known: y"),
])
def test_unknown_stage_or_param_is_a_config_error(tmp_path, sets, manifest, message):
    graph = load_stage_graph(write(tmp_path, GOOD))
    with pytest.raises(ConfigError) as err:
        resolve_params(graph, dataset(manifest), parse_sets(sets))
    assert str(err.value).startswith(message)
