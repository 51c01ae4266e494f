"""Import of public feature layouts (npy, npz, pkl, h5) into first-class stores; time mapping of each
public convention; bad input; export back to .npy; verify against records; the CLI end to end."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.store import create_store, open_stage_store
from pipeline.store.commands import export_features, import_features, verify
from pipeline.store.imports import lookup


def _ann(path: Path, videos: dict[str, float | None]) -> Path:
    db = {vid: {"subset": "validation", "duration": 100.0, "annotations": [{"segment": [1.0, 2.0], "label": "Jump"}],
                **({"fps": fps} if fps else {})} for vid, fps in videos.items()}
    path.write_text(json.dumps({"database": db}))
    return path


def _cmd(tmp_path: Path, annotations: Path | None, name: str = "toy"):
    from pipeline.datasets import Dataset

    ds = Dataset(name=name, task="localize", path=tmp_path / f"{name}.yaml", root=tmp_path, videos=None,
                 annotations=annotations, splits={"train": "validation"}, params={})
    cache = tmp_path / "cache"
    return SimpleNamespace(cache_dir=cache, json=False, load_dataset=lambda _: ds,
                           stage_dir=lambda *a, **k: None)


def _feats(seed: int, t: int, c: int) -> np.ndarray:
    return np.random.default_rng(seed).random((t, c), dtype=np.float32)


def test_thumos_i3d_npy_import_time_mapping_records_and_export(tmp_path, capsys):
    src = tmp_path / "i3d_features"
    src.mkdir()
    arrays = {"video_validation_0000051": _feats(0, 40, 2048), "video_test_0000004": _feats(1, 25, 2048)}
    for vid, arr in arrays.items():
        np.save(src / f"{vid}.npy", arr)
    ann = _ann(tmp_path / "th.json", {"video_validation_0000051": 30.0, "video_test_0000004": 25.0, "other": 30.0})
    cmd = _cmd(tmp_path, ann)
    assert import_features([str(src), "--dataset", "thumos", "--format", "npy", "--preset", "thumos_i3d"], cmd) == 0

    reg = lookup(cmd.cache_dir, cmd.load_dataset(None))
    assert reg["format"] == "npy" and reg["source"] == str(src.resolve()) and reg["videos"] == 2
    out = Path(reg["dir"])
    assert out == cmd.cache_dir / "extract" / reg["key"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["imported_from"] == str(src.resolve()) and manifest["key"] == reg["key"]
    assert manifest["dataset"] == "toy" and manifest["stage"] == "extract"
    from pipeline.cache import Cache

    assert sorted(Cache(cmd.cache_dir).read_records(out)) == sorted(arrays)
    store = open_stage_store(out)
    assert store.videos() == sorted(arrays)
    assert store.attrs["stride"] == 4 and store.attrs["clip_len"] == 16 and store.attrs["fps_policy"] == "native"
    for vid, arr in arrays.items():
        np.testing.assert_array_equal(store.read(vid, raw=True), arr.astype(np.float16))
        record = json.loads((out / "items" / f"{vid}.json").read_text())
        assert record["id"] == vid and record["shape"] == list(arr.shape)
        assert record["source_fingerprint"] == store.video_attrs(vid)["source_fingerprint"]
    # ActionFormer THUMOS I3D: t_i = (4i + 8) / fps with each video's fps.
    i = np.arange(40)
    np.testing.assert_allclose(store.grid("video_validation_0000051").to_seconds(i), (4 * i + 8) / 30.0)
    np.testing.assert_allclose(store.grid("video_test_0000004").to_seconds(i), (4 * i + 8) / 25.0)
    np.testing.assert_allclose(store.grid("video_test_0000004").to_index((4 * 7 + 8) / 25.0), 7)
    store.close()

    # Importing the same files again finds the same key; export writes per-video .npy back.
    assert import_features([str(src), "--dataset", "thumos", "--format", "npy", "--preset", "thumos_i3d"], cmd) == 0
    assert lookup(cmd.cache_dir, cmd.load_dataset(None))["key"] == reg["key"]
    assert export_features(["--dataset", "thumos", "--to", str(tmp_path / "exported")], cmd) == 0
    for vid, arr in arrays.items():
        back = np.load(tmp_path / "exported" / f"{vid}.npy")
        assert back.dtype == np.float32
        np.testing.assert_array_equal(back, arr.astype(np.float16).astype(np.float32))
    assert verify([], cmd) == 0


def test_epic_slowfast_npz_without_annotations(tmp_path):
    src = tmp_path / "epic"
    src.mkdir()
    arr = _feats(2, 12, 2304)
    np.savez(src / "P01_01.npz", feats=arr)
    cmd = _cmd(tmp_path, None)
    import_features([str(src), "--dataset", "epic", "--format", "npz", "--preset", "epic_slowfast",
                     "--dtype", "float32"], cmd)
    store = open_stage_store(lookup(cmd.cache_dir, cmd.load_dataset(None))["dir"])
    np.testing.assert_array_equal(store.read("P01_01"), arr)
    i = np.arange(12)
    # EPIC-KITCHENS SlowFast: 32-frame windows every 16 frames at 30 fps: t_i = (16i + 16) / 30.
    np.testing.assert_allclose(store.grid("P01_01").to_seconds(i), (16 * i + 16) / 30.0)


def test_anet_tsp_pkl_with_v_prefix_and_merged_h5(tmp_path):
    ann = _ann(tmp_path / "anet.json", {"abc": 30.0, "xyz-1": None})
    arrays = {"abc": _feats(3, 9, 512), "xyz-1": _feats(4, 5, 512)}
    pkl_dir = tmp_path / "tsp_pkl"
    pkl_dir.mkdir()
    for vid, arr in arrays.items():
        (pkl_dir / f"v_{vid}.pkl").write_bytes(pickle.dumps(arr))
    with h5py.File(tmp_path / "tsp_merged.h5", "w") as f:
        for vid, arr in arrays.items():
            f[f"v_{vid}"] = arr
    i = np.arange(9)
    keys = set()
    for src, fmt in [(pkl_dir, "pkl"), (tmp_path / "tsp_merged.h5", "h5")]:
        cmd = _cmd(tmp_path, ann)
        import_features([str(src), "--dataset", "anet", "--format", fmt, "--preset", "anet_tsp"], cmd)
        reg = lookup(cmd.cache_dir, cmd.load_dataset(None))
        keys.add(reg["key"])
        store = open_stage_store(reg["dir"])
        assert store.videos() == ["abc", "xyz-1"]  # ids as in the annotations, without "v_"
        for vid, arr in arrays.items():
            np.testing.assert_array_equal(store.read(vid), arr.astype(np.float16).astype(np.float32))
        # ActivityNet TSP: 15 fps, 16-frame clips, stride 16: t_i = (16i + 8) / 15.
        np.testing.assert_allclose(store.grid("abc").to_seconds(i), (16 * i + 8) / 15.0)
        assert store.video_attrs("abc")["native_fps"] == 30.0 and store.video_attrs("abc")["sampled_fps"] == 15.0
    assert len(keys) == 2


def _bad_import(tmp_path: Path, files: dict[str, object], match: str, preset=("--stride", "4", "--clip-len", "16")):
    src = tmp_path / "bad"
    src.mkdir()
    for name, arr in files.items():
        np.save(src / f"{name}.npy", arr)
    ann = _ann(tmp_path / "a.json", {"v1": 30.0, "v2": 30.0, "v3": 30.0})
    cmd = _cmd(tmp_path, ann)
    with pytest.raises(ConfigError, match=match):
        import_features([str(src), "--dataset", "d", "--format", "npy", *preset], cmd)
    # Nothing imported half: no store, no record, no registration.
    assert lookup(cmd.cache_dir, cmd.load_dataset(None)) is None
    extract = cmd.cache_dir / "extract"
    assert not extract.exists() or list(extract.iterdir()) == []


@pytest.mark.parametrize("files, match", [
    ({"v1": _feats(0, 5, 8), "v2": _feats(1, 5, 8), "v3": _feats(2, 5, 6)}, r"bad/v3\.npy: feature dimension 6 differs"),
    ({"v1": _feats(0, 5, 8), "v2": np.array([["a", "b"]] * 3)}, r"bad/v2\.npy: features must be a numeric array"),
    ({"v1": _feats(0, 5, 8), "v2": np.array([[1.0, np.nan]] * 3)}, r"bad/v2\.npy: features contain NaN/Inf"),
    ({"v1": _feats(0, 5, 8), "v2": np.array([[1.0, np.inf]] * 3)}, r"bad/v2\.npy: features contain NaN/Inf"),
    ({"v1": _feats(0, 5, 8), "nope": _feats(1, 5, 8)}, r"bad/nope\.npy: 1 of 2 feature files name no video"),
    ({"v1": _feats(0, 5, 8), "v2": np.zeros(5)}, r"bad/v2\.npy: features must have shape \(T, C\)"),
    ({"v1": np.full((3, 8), 1e6)}, r"bad/v1\.npy: .*float16 range"),
])
def test_bad_input_names_the_file_and_imports_nothing(tmp_path, files, match):
    _bad_import(tmp_path, files, match)


def test_preset_dimension_and_missing_mapping(tmp_path):
    _bad_import(tmp_path, {"v1": _feats(0, 5, 8)}, r"v1\.npy: feature dimension 8, but preset thumos_i3d has 2048",
                preset=("--preset", "thumos_i3d"))
    cmd = _cmd(tmp_path, None)
    with pytest.raises(ConfigError, match="--stride and --clip-len"):
        import_features([str(tmp_path / "bad"), "--dataset", "d", "--format", "npy"], cmd)
    with pytest.raises(ConfigError, match="no fps for video 'v1'"):
        import_features([str(tmp_path / "bad"), "--dataset", "d", "--format", "npy", "--stride", "4",
                         "--clip-len", "16"], cmd)


def test_verify_reports_and_repairs_store_and_record_mismatches(tmp_path, capsys):
    out = tmp_path / "cache" / "extract" / "k1"
    store = create_store(out, attrs={"stride": 4, "clip_len": 16, "fps": 30.0})
    for vid in ("ok", "norecord", "nodata"):
        store.write(vid, _feats(0, 4, 8), {"source_fingerprint": "fp"})
    store._write_data("half", _feats(0, 4, 8).astype(np.float16), {})
    store.delete("nodata")
    store.close()
    for vid in ("ok", "nodata"):
        (out / "items").mkdir(exist_ok=True)
        (out / "items" / f"{vid}.json").write_text(json.dumps({"id": vid, "source_fingerprint": "fp", "shape": [4, 8]}))
    cmd = _cmd(tmp_path, None)
    assert verify([], cmd) == 1
    text = capsys.readouterr().out
    assert "half: incomplete" in text and "norecord: data without a completion record" in text
    assert "nodata: completion record without complete data" in text and "ok:" not in text
    assert verify(["--repair"], cmd) == 0
    assert verify([], cmd) == 0
    assert open_stage_store(out).videos() == ["ok"] and [p.stem for p in (out / "items").iterdir()] == ["ok"]

    (out / "features.zarr" / "zarr.json").write_text("{broken")
    assert verify(["--repair"], cmd) == 1
    assert "store unreadable" in capsys.readouterr().out


def test_cli_import_then_status_sees_imported_extract(tmp_path, capsys):
    from pipeline.cli import main

    src = tmp_path / "feats"
    src.mkdir()
    np.save(src / "v1.npy", _feats(0, 6, 16))
    _ann(tmp_path / "ann.json", {"v1": 30.0})
    manifest = tmp_path / "mini.yaml"
    # Videos behind an unset variable: importing features must not need them, extracting must.
    manifest.write_text("name: mini\ntask: localize\nvideos: ${MINI_VIDEOS_UNSET}\nannotations: ann.json\n"
                        "splits: {train: validation}\n")
    cache = tmp_path / "cache"
    assert main(["--cache-dir", str(cache), "import-features", str(src), "--dataset", str(manifest),
                 "--format", "npy", "--stride", "4", "--clip-len", "16"]) == 0
    mini = SimpleNamespace(name="mini", path=manifest)
    reg = lookup(cache, mini)
    assert open_stage_store(reg["dir"]).videos() == ["v1"]
    capsys.readouterr()
    assert main(["--cache-dir", str(cache), "--json", "verify"]) == 0
    assert json.loads(capsys.readouterr().out)["stores"][0]["videos"] == 1
    assert main(["--cache-dir", str(cache), "status", "--dataset", str(manifest)]) == 0
    assert f"imported from {src}" in capsys.readouterr().out
    # gc keeps the imported store: the registration is a root like a current key
    assert main(["--cache-dir", str(cache), "gc", "--dataset", str(manifest)]) == 0
    assert (Path(reg["dir"]) / "manifest.json").is_file()
    assert main(["--cache-dir", str(cache), "import-features", "--unregister", "--dataset", str(manifest)]) == 0
    assert lookup(cache, mini) is None
    capsys.readouterr()
    assert main(["--cache-dir", str(cache), "run", "extract", "--dataset", str(manifest)]) == 2
    assert "MINI_VIDEOS_UNSET is not set" in capsys.readouterr().err


def test_two_manifests_named_alike_keep_their_own_imports(tmp_path, capsys):
    """Imports belong to a manifest file (path, then content), not to its `name:`; export takes the right one."""
    from pipeline.cli import main

    cache = tmp_path / "cache"
    manifests = []
    for i, sub in enumerate(("a", "b")):
        d = tmp_path / sub
        (d / "feats").mkdir(parents=True)
        np.save(d / "feats" / "v1.npy", _feats(i, 6, 16))
        _ann(d / "ann.json", {"v1": 30.0})
        (d / "same.yaml").write_text("name: same\ntask: localize\nannotations: ann.json\nsplits: {train: validation}\n")
        manifests.append(d / "same.yaml")
        assert main(["--cache-dir", str(cache), "import-features", str(d / "feats"), "--dataset", str(d / "same.yaml"),
                     "--format", "npy", "--stride", "4", "--clip-len", "16"]) == 0
        assert "stored as float16 (values changed by up to" in capsys.readouterr().err
    for i, m in enumerate(manifests):
        assert main(["--cache-dir", str(cache), "export", "--dataset", str(m), "--to", str(tmp_path / f"out{i}")]) == 0
        np.testing.assert_array_equal(np.load(tmp_path / f"out{i}" / "v1.npy"),
                                      _feats(i, 6, 16).astype(np.float16).astype(np.float32))
    # a manifest moved elsewhere keeps its import (found by its content)
    moved = tmp_path / "moved.yaml"
    moved.write_text(manifests[0].read_text() + "# moved\n")
    assert lookup(cache, SimpleNamespace(name="same", path=moved)) is None
    manifests[0].rename(moved := tmp_path / "a" / "renamed.yaml")
    assert lookup(cache, SimpleNamespace(name="same", path=moved))["source"] == str((tmp_path / "a" / "feats").resolve())


def test_every_misnamed_file_is_counted_and_v_prefixed_ids_get_a_hint(tmp_path):
    src = tmp_path / "feats"
    src.mkdir()
    for vid in ("abc", "def", "ghi", "jkl", "v_ok"):
        np.save(src / f"{vid}.npy", _feats(0, 5, 8))
    ann = _ann(tmp_path / "a.json", {"v_abc": 30.0, "v_def": 30.0, "ok": 30.0})
    cmd = _cmd(tmp_path, ann)
    with pytest.raises(ConfigError, match=r"4 of 5 feature files name no video of the annotations of toy .*"
                                          r"abc\.npy, .*def\.npy, .*ghi\.npy, \.\.\.; 2 of them match with a 'v_' prefix"):
        import_features([str(src), "--dataset", "d", "--format", "npy", "--stride", "4", "--clip-len", "16"], cmd)
