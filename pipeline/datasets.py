"""Dataset manifests (data/<name>.yaml or any path) -> a frozen ``Dataset``, validated once.

Environment variables in path fields are expanded (``${THUMOS_VIDEOS}``; an unset one is an error
naming it); relative paths are relative to the manifest. A manifest with a ``generate:`` block gets
its videos and annotations from the demo generator under ``<cache>/datasets/``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.context import write_json_atomic
from pipeline.errors import ConfigError
from pipeline.stage_graph import load_yaml

MANIFEST_FIELDS = ("name", "task", "description", "videos", "annotations", "splits", "params", "generate",
                   "features", "video_set")
# A detect dataset names the standard AVA files per split (DESIGN.md, "Dataset manifests").
DETECT_FIELDS = ("name", "task", "description", "videos", "timestamp_offset_s", "labelmap", "annotations",
                 "exclusions", "proposals", "splits", "params", "generate")
TASKS = ("localize", "detect")
VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                              ".ogv"})
# Fields of a generate: block that shape the annotations only (pipeline/demo_data.py DemoSpec.events):
# they do not enter the generated videos' identity (generated_dir)
ANNOTATION_FIELDS = ("events",)
_VAR = re.compile(r"\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class AvaLayout:
    """The AVA files of a detect dataset, resolved to absolute paths; split name -> file."""

    labelmap: Path
    annotations: dict[str, Path]
    exclusions: dict[str, Path]
    proposals: dict[str, Path]
    timestamp_offset_s: float
    splits: dict[str, str]  # role (train / test) -> split name
    manifest: Path

    def resolve_split(self, name: str) -> str:
        """A split name, or a role of ``splits:`` naming one."""
        known = {**self.annotations, **self.proposals}
        if name in known:
            return name
        if name in self.splits and self.splits[name] in known:
            return self.splits[name]
        raise ConfigError(f"{self.manifest}: split {name!r}: not in annotations or proposals "
                          f"(splits: {', '.join(sorted(known)) or 'none'})")

    def files(self) -> dict[str, Path]:
        """Every file the layout names, by its manifest key (``annotations.val``); stage keys fingerprint them."""
        out = {"labelmap": self.labelmap}
        for key in ("annotations", "exclusions", "proposals"):
            out.update((f"{key}.{split}", p) for split, p in sorted(getattr(self, key).items()))
        return out


@dataclass(frozen=True)
class Dataset:
    name: str
    task: str
    path: Path  # the manifest file
    root: Path  # its directory
    videos: Path | None
    annotations: Path | None
    splits: dict
    params: dict  # stage -> overrides
    generate: dict | None = None
    features: dict | None = None
    # Why `videos` is None when its ${VAR} is unset: an error only for stages that read the videos,
    # so imported features train without THUMOS_VIDEOS.
    videos_error: str | None = None
    ava: AvaLayout | None = None  # task: detect
    # The collection of videos the manifest annotates (default: its name). Per-video stages (extract) key
    # on it, and generated videos live under it: manifests that annotate the same videos differently
    # (demo and demo_points) share one extraction.
    video_set: str | None = None

    @property
    def videos_name(self) -> str:
        return self.video_set or self.name

    def check_paths(self, need_videos: bool) -> None:
        """For ``run``: the videos directory and the annotation file must exist."""
        if need_videos:
            if self.videos_error:
                raise ConfigError(self.videos_error)
            if self.videos is None:
                raise ConfigError(f"{self.path}: videos: not set (a directory of <video_id>.<ext> files)")
            if not self.videos.is_dir():
                raise ConfigError(f"{self.path}: videos: directory not found: {self.videos}")
        if self.annotations is not None and not self.annotations.exists():
            raise ConfigError(f"{self.path}: annotations: not found: {self.annotations}")
        if self.ava is not None and self.generate is None:
            for key, p in self.ava.files().items():
                if not p.is_file():
                    raise ConfigError(f"{self.path}: {key}: not found: {p}")


def manifest_dir(project_root: Path) -> Path:
    return project_root / "data"


def known_manifests(project_root: Path) -> list[Path]:
    d = manifest_dir(project_root)
    return sorted(p for p in d.glob("*.y*ml") if p.suffix in (".yaml", ".yml")) if d.is_dir() else []


def find_manifest(name_or_path: str | Path, project_root: Path) -> Path:
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or os.sep in str(name_or_path):
        if not candidate.is_file():
            raise ConfigError(f"{candidate}: dataset manifest not found")
        return candidate.resolve()
    for suffix in (".yaml", ".yml"):
        p = manifest_dir(project_root) / f"{name_or_path}{suffix}"
        if p.is_file():
            return p
    known = ", ".join(p.stem for p in known_manifests(project_root)) or "none"
    raise ConfigError(f"--dataset {name_or_path}: no manifest {manifest_dir(project_root)}/{name_or_path}.yaml;"
                      f" known: {known} (or give a path to a manifest)")


def load_dataset(name_or_path: str | Path, project_root: Path, cache_dir: Path) -> Dataset:
    import yaml

    path = find_manifest(name_or_path, project_root)
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of fields ({', '.join(MANIFEST_FIELDS)})")
    task = raw.get("task", "localize")
    if task not in TASKS:
        raise ConfigError(f"{path}: task: expected one of {', '.join(TASKS)}, got {task!r}")
    allowed = DETECT_FIELDS if task == "detect" else MANIFEST_FIELDS
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{path}: {key}: unknown field of a {task} dataset; known: {', '.join(allowed)}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"{path}: name: expected a plain name (letters, digits, _ . -), got {name!r}")

    def mapping(key: str) -> dict | None:
        value = raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}: {key}: expected a mapping, got {value!r}")
        return value

    splits = mapping("splits") or {}
    for role, subset in splits.items():
        if not isinstance(subset, str):
            raise ConfigError(f"{path}: splits.{role}: expected a subset name, got {subset!r}")
    params = mapping("params") or {}
    for stage, overrides in params.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: params.{stage}: expected a mapping of param -> value")
    generate = mapping("generate")
    video_set = raw.get("video_set")
    if video_set is not None and (not isinstance(video_set, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", video_set)):
        raise ConfigError(f"{path}: video_set: expected a plain name (letters, digits, _ . -), got {video_set!r}")
    videos_error = None
    try:
        videos = _path_field(path, raw, "videos")
    except ConfigError as exc:
        videos, videos_error = None, str(exc)
    if task == "detect":
        # Generated detect data: the layout's relative paths are inside the generator's directory.
        base = path.parent
        if generate is not None:
            if raw.get("videos") is not None:
                raise ConfigError(f"{path}: videos: not allowed with generate: (the generator places them)")
            base = generated_dir(cache_dir, name, generate)
            videos = base / "videos"
        ava = _ava_layout(path, raw, base, splits)
        return Dataset(name=name, task=task, path=path, root=path.parent, videos=videos, annotations=None,
                       splits=splits, params=params, generate=generate, videos_error=videos_error, ava=ava)
    annotations = _path_field(path, raw, "annotations")
    if generate is not None:
        for key in ("videos", "annotations"):
            if raw.get(key) is not None:
                raise ConfigError(f"{path}: {key}: not allowed with generate: (the generator places them)")
        videos, annotations = _generated_paths(cache_dir, name, video_set or name, generate)
    return Dataset(name=name, task=task, path=path, root=path.parent, videos=videos, annotations=annotations,
                   splits=splits, params=params, generate=generate, features=mapping("features"),
                   videos_error=videos_error, video_set=video_set)


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def generated_dir(cache_dir: Path, name: str, generate: dict) -> Path:
    """The generated data of video set ``name``; the spec's annotation-only fields (the demo's
    ``events``) are left out, so the segment and point annotations of one spec share the videos."""
    videos_spec = {k: v for k, v in generate.items() if k not in ANNOTATION_FIELDS}
    return cache_dir / "datasets" / f"{name}-{_digest(videos_spec)}"


def generation_record(cache_dir: Path, name: str, generate: dict) -> Path:
    """Where ``run`` records the paths the generator returned for manifest ``name`` (read by ``status``
    and later runs)."""
    return cache_dir / "datasets" / f"{name}-{_digest(generate)}.json"


def _generated_paths(cache_dir: Path, name: str, video_set: str, generate: dict) -> tuple[Path, Path]:
    """Where the generator put this dataset (recorded by the last ``run``), else its default place."""
    try:
        with open(generation_record(cache_dir, name, generate)) as f:
            made = json.load(f)
        return Path(made["videos"]), Path(made["annotations"])
    except (OSError, ValueError, KeyError):
        d = generated_dir(cache_dir, video_set, generate)
        return d / "videos", d / "annotations.json"


def ensure_generated(dataset: Dataset, cache_dir: Path) -> Dataset:
    """Generate the demo data of a manifest with a ``generate:`` block (a no-op when already complete)
    and return the dataset pointing at it. ``status`` never generates; it reads the recorded paths."""
    if dataset.generate is None:
        return dataset
    if dataset.task == "detect":  # the manifest names the files inside the generated directory
        from pipeline.demo_ava import ensure_generated as generate_ava

        generate_ava(dataset.generate, generated_dir(cache_dir, dataset.name, dataset.generate),
                     dataset.ava.timestamp_offset_s)
        return dataset
    if dataset.videos.is_dir() and dataset.annotations.is_file():
        return dataset  # recorded by an earlier run; the generator renames a dataset in only when complete
    from pipeline.demo_data import ensure_generated as generate

    videos, annotations = generate(dataset.generate, generated_dir(cache_dir, dataset.videos_name, dataset.generate))
    videos, annotations = Path(videos).resolve(), Path(annotations).resolve()
    if (videos, annotations) != (dataset.videos, dataset.annotations):
        write_json_atomic(generation_record(cache_dir, dataset.name, dataset.generate),
                          {"videos": str(videos), "annotations": str(annotations)})
    return replace(dataset, videos=videos, annotations=annotations)


def _ava_layout(path: Path, raw: dict, base: Path, splits: dict) -> AvaLayout:
    def files(key: str, required: bool) -> dict[str, Path]:
        value = raw.get(key)
        if value is None and not required:
            return {}
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"{path}: {key}: expected a mapping split -> file, got {value!r}")
        return {str(split): _path_value(path, f"{key}.{split}", f, base) for split, f in value.items()}

    if raw.get("labelmap") is None:
        raise ConfigError(f"{path}: labelmap: required for a detect dataset (an AVA label map .pbtxt)")
    labelmap = _path_value(path, "labelmap", raw["labelmap"], base)
    annotations, proposals = files("annotations", False), files("proposals", False)
    exclusions = files("exclusions", False)
    if not annotations and not proposals:
        raise ConfigError(f"{path}: annotations: required for a detect dataset (split -> AVA CSV)")
    known = set(annotations) | set(proposals)
    for split in exclusions:
        if split not in known:
            raise ConfigError(f"{path}: exclusions.{split}: no annotations or proposals for split {split!r}")
    for role, split in splits.items():
        if split not in known:
            raise ConfigError(f"{path}: splits.{role}: {split!r} is not a split of annotations or proposals "
                              f"({', '.join(sorted(known))})")
    offset = raw.get("timestamp_offset_s", 0)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or offset < 0:
        raise ConfigError(f"{path}: timestamp_offset_s: expected seconds >= 0, got {offset!r}")
    return AvaLayout(labelmap=labelmap, annotations=annotations, exclusions=exclusions, proposals=proposals,
                     timestamp_offset_s=float(offset), splits=dict(splits), manifest=path)


def _path_field(path: Path, raw: dict, key: str) -> Path | None:
    value = raw.get(key)
    if value is None:
        return None
    return _path_value(path, key, value, path.parent)


def _path_value(path: Path, key: str, value, base: Path) -> Path:
    """A path field with environment variables expanded, relative to ``base``."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: {key}: expected a path, got {value!r}")

    def expand(m: re.Match) -> str:
        var = m.group(1) if m.group(1) is not None else m.group(2)
        if var not in os.environ:
            raise ConfigError(f"{path}: {key}: environment variable {var} is not set")
        return os.environ[var]

    p = Path(os.path.expanduser(_VAR.sub(expand, value)))
    return p if p.is_absolute() else (base / p).resolve()


def list_items(dataset: Dataset) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(video id, absolute path) of every video file in the videos directory, by id; and (file name,
    path, reason) of the files with a video extension that cannot be items: a symlink loop, a dangling
    symlink, a directory, a FIFO or other special file, or one of two files with the same stem (video
    ids are file stems). Those fail on their own; the dataset's other videos go on."""
    found: dict[str, list[tuple[str, str]]] = {}
    unusable: list[tuple[str, str, str]] = []
    videos = os.path.abspath(dataset.videos)
    with os.scandir(videos) as entries:
        for e in entries:
            stem, ext = os.path.splitext(e.name)
            if ext.lower() not in VIDEO_EXTENSIONS or e.name.startswith("."):
                continue
            why = _not_a_video_file(e.path)
            if why:
                unusable.append((e.name, e.path, why))
            else:
                found.setdefault(stem, []).append((e.name, e.path))
    items = []
    for stem, files in found.items():
        if len(files) == 1:
            items.append((stem, files[0][1]))
            continue
        names = " and ".join(sorted(name for name, _ in files))
        unusable += [(name, path, f"two files with video id {stem!r}: {names} (video ids are file stems; "
                                  f"rename one)") for name, path in files]
    return sorted(items), sorted(unusable)


def _not_a_video_file(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        if exc.errno == errno.ENOENT:
            return f"dangling symlink to {os.readlink(path)}" if os.path.islink(path) else "vanished"
        return f"cannot stat: {exc.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not a video file"
    if stat.S_ISFIFO(st.st_mode):
        return "a FIFO (named pipe), not a video file"
    if not stat.S_ISREG(st.st_mode):
        return "a special file, not a regular video file"
    if not os.access(path, os.R_OK):
        return "not readable (permission denied)"
    return None
