"""pipeline.code_graph: the files a stage entry can reach, on a package written here and on the
project's own stages (a plot or CLI module never enters a training key)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from pipeline.code_graph import reachable_modules

ROOT = Path(__file__).resolve().parents[1]


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path / "pkg"


def _names(entry: str, pkg: Path) -> set[str]:
    return set(reachable_modules(entry, {"pkg": pkg}))


def test_entry_function_imports_follow_names_and_skip_other_functions(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "stage.py": """
            from pkg import common

            def train(ctx):
                return _helper(ctx)

            def _helper(ctx):
                from pkg.model import build
                return build()

            def evaluate(ctx):
                from pkg import metric
                return metric.score()
            """,
        "common.py": "",
        "model.py": "from .layers import block\n",
        "layers/__init__.py": "from pkg.layers.block import Block\n",
        "layers/block.py": "",
        "metric.py": "",
        "plots.py": "",
    })
    train = _names("pkg.stage:train", pkg)
    assert train == {"pkg", "pkg.stage", "pkg.common", "pkg.model", "pkg.layers", "pkg.layers.block"}
    assert _names("pkg.stage:evaluate", pkg) == {"pkg", "pkg.stage", "pkg.common", "pkg.metric"}


def test_registries_by_string_and_multiline_imports_are_followed(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "stage.py": """
            from pkg.registry import build

            def run(ctx):
                return build("a")
            """,
        "registry.py": 'MODELS = {"a": "pkg.models.a:build"}\n',
        "models/__init__.py": "",
        "models/a.py": "from pkg.util import (\n    one,\n    two,\n)\n",
        "util.py": "",
        "unused.py": "",
    })
    assert _names("pkg.stage:run", pkg) == {"pkg", "pkg.stage", "pkg.registry", "pkg.models", "pkg.models.a",
                                           "pkg.util"}


def test_project_training_keys_leave_out_plots_and_cli():
    train = reachable_modules("localizers.stage:train", {"localizers": ROOT / "localizers"})
    assert {"localizers.train", "localizers.backbone", "localizers.losses"} <= set(train)
    assert not {"localizers.plots", "localizers.show", "localizers.cli"} & set(train)
    evaluate = reachable_modules("localizers.stage:evaluate", {"localizers": ROOT / "localizers"})
    # training's periodic validation (localize.val_every) scores with the evaluator: in both keys
    assert "localizers.anet_map" in evaluate and "localizers.anet_map" in train
    assert "localizers.formats" in evaluate and "localizers.formats" not in train
    extract = reachable_modules("extractors.stage:extract", {"extractors": ROOT / "extractors"})
    assert {"extractors.i3d", "extractors.videomae"} <= set(extract)  # the backbone registry's strings


def test_a_single_module_of_another_package_counts_alone():
    """``code: [localizers, pipeline.trainer]``: the shared training loop is in the key, the rest of
    pipeline/ (stores, CLI) is not."""
    packages = {"localizers": ROOT / "localizers", "pipeline.trainer": ROOT / "pipeline" / "trainer.py"}
    train = reachable_modules("localizers.stage:train", packages)
    assert "pipeline.trainer" in train
    assert not [m for m in train if m.startswith("pipeline.") and m != "pipeline.trainer"]
