"""AVA annotation files: action CSVs, label maps, excluded timestamps, person-box proposals.

Read by the keyframe extraction, the detect stages and the evaluator alike. Every reader validates once:
a malformed row (wrong column count, a field that is not a number, an unknown label id) is a ConfigError
naming the file, the line and the field. Boxes outside [0, 1] are clipped and boxes with x2 <= x1 or
y2 <= y1 dropped; both are counted in the ``stats`` of what a reader returns, for the caller to log.

Planning never imports this module (it imports numpy).
"""

from __future__ import annotations

import csv
import math
import pickle
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from pipeline.boxes import clip_boxes, valid_boxes
from pipeline.errors import ConfigError

# AVA annotates 80 actions; the label maps evaluate 60 of them. Rows of the other 20 are dropped (as the
# official evaluator drops them); an id in neither the label map nor this range is an error.
AVA_ACTION_IDS = frozenset(range(1, 81))
_BOX_COLUMNS = ("x1", "y1", "x2", "y2")


def keyframe_id(video_id: str, timestamp: int) -> str:
    """The official key of a keyframe, ``"video,0902"`` (the key of the mmaction2 proposal pickles too)."""
    return f"{video_id},{int(timestamp):04d}"


def parse_keyframe_id(s: str) -> tuple[str, int]:
    video, sep, ts = str(s).rpartition(",")
    if not sep or not video or not ts.strip().isdigit():
        raise ConfigError(f"keyframe id {s!r}: expected 'video_id,timestamp'")
    return video, int(ts)


@dataclass
class ReadStats:
    """What a reader kept, fixed and dropped; ``summary()`` is the line the caller logs."""

    path: str
    rows: int = 0
    keyframes: int = 0
    boxes: int = 0
    clipped: int = 0  # boxes outside [0, 1], clipped
    degenerate: int = 0  # boxes with x2 <= x1 or y2 <= y1 (after clipping), dropped
    unlisted_rows: int = 0  # rows whose action is not in the label map, dropped
    below_score: int = 0  # proposals under the score threshold, dropped
    excluded: int = 0  # keyframes listed in the excluded timestamps, dropped

    def summary(self) -> str:
        notes = {"clipped": "boxes clipped to [0, 1]", "degenerate": "degenerate boxes dropped",
                 "unlisted_rows": "rows of actions outside the label map dropped",
                 "below_score": "boxes below the score threshold dropped",
                 "excluded": "excluded keyframes dropped"}
        dropped = [f"{getattr(self, k)} {text}" for k, text in notes.items() if getattr(self, k)]
        return (f"{self.path}: {self.rows} rows, {self.keyframes} keyframes, {self.boxes} boxes"
                + (f"; {', '.join(dropped)}" if dropped else ""))

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class KeyframeTable(dict):
    """``{(video_id, timestamp): value}`` in file order, with the ``stats`` of the read."""

    def __init__(self, items=(), stats: ReadStats | None = None):
        super().__init__(items)
        self.stats = stats


@dataclass(frozen=True)
class KeyframeBoxes:
    """The annotated people of one keyframe: one row per box, its actions merged from the CSV's rows."""

    boxes: np.ndarray  # (N, 4) float32 normalised xyxy
    labels: tuple[tuple[int, ...], ...]  # action ids per box, sorted (empty: only unlisted actions)
    person_ids: tuple[int, ...]  # -1 where the file has none


# ---------------------------------------------------------------------------------------------- label maps

_PBTXT_ITEM = re.compile(r"\b(?:item|label)\s*\{(.*?)\}", re.S)
_PBTXT_NAME = re.compile(r"""\b(?:display_)?name\s*:\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)')""")
_PBTXT_ID = re.compile(r"\b(?:label_)?id\s*:\s*(-?\d+)\b")
_TXT_LINE = re.compile(r"^\s*(\d+)\s*:\s*(.*\S)\s*$")


def read_labelmap(path: str | Path) -> dict[int, str]:
    """id -> name, in id order. Reads the AVA pbtxt (``item { name: "..." id: N }`` as in the 2018 list, or
    ``label_id: N`` as in the 2019 one) and mmaction2's ``label_map.txt`` (``N: name`` per line)."""
    path = Path(path)
    text = _read_text(path, "label map")
    if "{" in text:
        out = _parse_pbtxt(path, text)
    else:
        out = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            m = _TXT_LINE.match(line)
            if m is None:
                raise ConfigError(f"{path}:{n}: expected 'id: name' (a label map line), got {line.strip()!r}")
            _add_label(out, path, n, int(m.group(1)), m.group(2))
    if not out:
        raise ConfigError(f"{path}: no labels (expected pbtxt items or 'id: name' lines)")
    return dict(sorted(out.items()))


def _parse_pbtxt(path: Path, text: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for m in _PBTXT_ITEM.finditer(text):
        body, line = m.group(1), text.count("\n", 0, m.start()) + 1
        name, ident = _PBTXT_NAME.search(body), _PBTXT_ID.search(body)
        if name is None or ident is None:
            missing = "name" if name is None else "id (or label_id)"
            raise ConfigError(f"{path}:{line}: item without {missing}")
        _add_label(out, path, line, int(ident.group(1)), name.group(1) if name.group(1) is not None
                   else name.group(2))
    return out


def _add_label(out: dict[int, str], path: Path, line: int, ident: int, name: str) -> None:
    if ident <= 0:
        raise ConfigError(f"{path}:{line}: id: expected a positive integer, got {ident}")
    if ident in out:
        raise ConfigError(f"{path}:{line}: id {ident} given twice ({out[ident]!r} and {name!r})")
    out[ident] = name


# ---------------------------------------------------------------------------------------------- CSV tables

def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {what} file not readable ({e})") from None


class CsvTable:
    """The columns of a header-less AVA CSV (blank lines skipped): ``ids`` (the first, video ids) and
    numbers by column, validated with errors naming the file, the line and the field.

    pandas' C parser reads well-formed files (a few hundred ms for AVA's 837k training rows); anything
    it does not read cleanly (ragged rows, quotes, a field that is not a number) is read again row by row
    to name the first bad one."""

    def __init__(self, path: Path, what: str, ncols: tuple[int, ...], columns: str):
        self.path, self._text = path, _read_text(path, what)
        self._columns = self._fast(ncols)
        if self._columns is None:
            self._columns = self._slow(ncols, columns)
        self.width = len(self._columns) if self._columns else (ncols[0] if ncols else 0)
        self.ids = self._columns[0] if self._columns else np.zeros(0, dtype=object)  # video ids (str)

    def __len__(self) -> int:
        return len(self.ids)

    def _fast(self, ncols: tuple[int, ...]) -> list | None:
        import io

        import pandas as pd

        try:
            df = pd.read_csv(io.StringIO(self._text), header=None, dtype={0: str}, skipinitialspace=True,
                             na_filter=False, skip_blank_lines=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError):
            return None
        # A short row is padded by pandas, a long one refused: equal comma counts mean no ragged row.
        text = self._text
        if (df.shape[1] not in ncols or text.count(",") != len(df) * (df.shape[1] - 1) or '"' in text
                or any(c in text for c in (" ,", "\t,", "\n ", "\n\t")) or text[:1] in (" ", "\t")):
            return None  # ragged rows, quotes, or spaces that the row-by-row reader strips
        return [df[c].to_numpy() for c in df.columns]

    def _slow(self, ncols: tuple[int, ...], columns: str) -> list:
        rows = [(n, [f.strip() for f in row]) for n, row in enumerate(csv.reader(self._text.splitlines()), 1)
                if len(row) > 1 or (row and row[0].strip())]
        width = next((len(row) for _, row in rows if len(row) in ncols), None)
        for n, row in rows:
            if len(row) != width:
                expected = width if width is not None else " or ".join(map(str, ncols))
                raise ConfigError(f"{self.path}:{n}: expected {expected} columns ({columns}), got {len(row)}")
        return [np.array(col, dtype=object) for col in zip(*(row for _, row in rows))]

    def line(self, i: int) -> int:
        """The line number of row ``i`` (for messages only: it scans the text)."""
        rows = (n for n, line in enumerate(self._text.splitlines(), 1) if line.strip())
        return next(n for k, n in enumerate(rows) if k == i)

    def numbers(self, col: int, name: str, integer: bool = False) -> np.ndarray:
        values = self._columns[col] if self._columns else np.zeros(0)
        out = None
        if values.dtype.kind in "iuf":
            out = values.astype(np.float64)
        else:
            try:
                out = np.array([float(str(v)) for v in values], dtype=np.float64)
            except ValueError:
                pass
        if out is None or not np.isfinite(out).all() or (integer and (out != np.round(out)).any()):
            for i, v in enumerate(values.tolist()):
                try:
                    x = float(str(v))
                except ValueError:
                    x = None
                if x is None or not math.isfinite(x) or (integer and x != round(x)):
                    kind = "an integer" if integer else "a number"
                    raise ConfigError(f"{self.path}:{self.line(i)}: {name}: expected {kind}, got {str(v).strip()!r}")
        return out

    def boxes(self) -> np.ndarray:
        """(N, 4) float64 from columns 2..5 (x1, y1, x2, y2)."""
        return np.stack([self.numbers(2 + i, name) for i, name in enumerate(_BOX_COLUMNS)], axis=1).reshape(-1, 4)

    def video_codes(self) -> tuple[np.ndarray, list[str]]:
        """(N,) int64 code of each row's video, in order of first appearance, and the videos by code."""
        import pandas as pd

        codes, videos = pd.factorize(self.ids)
        return codes.astype(np.int64), [str(v) for v in videos]


def _fix_boxes(boxes: np.ndarray, stats: ReadStats) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth and proposal boxes: clipped to [0, 1] and counted; degenerate ones masked out, counted."""
    boxes, changed = clip_boxes(boxes)
    keep = valid_boxes(boxes)
    stats.clipped += int((changed & keep).sum())
    stats.degenerate += int((~keep).sum())
    return boxes, keep


# ------------------------------------------------------------------------------------------------- readers

def read_exclusions(path: str | Path) -> set[tuple[str, int]]:
    """``video_id, timestamp`` rows (``ava_*_excluded_timestamps_*.csv``)."""
    path = Path(path)
    table = CsvTable(path, "excluded timestamps", (2,), "video_id, timestamp")
    return set(zip(table.ids, table.numbers(1, "timestamp", integer=True).astype(np.int64).tolist()))


def _groups(*columns: np.ndarray) -> np.ndarray:
    """The group of each row of equal values across ``columns``, numbered in order of first appearance."""
    import pandas as pd

    if len(columns[0]) == 0:
        return np.zeros(0, dtype=np.int64)
    frame = pd.DataFrame({str(i): c for i, c in enumerate(columns)})
    return frame.groupby(list(frame.columns), sort=False).ngroup().to_numpy().astype(np.int64)


def read_boxes(path: str | Path, label_ids: set[int] | None = None) -> KeyframeTable:
    """A ground-truth CSV (``video_id, timestamp, x1, y1, x2, y2, action_id[, person_id]``, one row per box
    and action) -> ``{(video, ts): KeyframeBoxes}``, rows of one box (same keyframe, person and coordinates)
    merged. ``label_ids``: the label map's ids; rows of other AVA actions are dropped and counted (their
    boxes stay, with the listed actions only, so training still sees those people)."""
    path = Path(path)
    table = CsvTable(path, "annotations", (7, 8), "video_id, timestamp, x1, y1, x2, y2, action_id, person_id")
    n = len(table)
    stats = ReadStats(str(path), rows=n)
    ts = table.numbers(1, "timestamp", integer=True).astype(np.int64)
    raw = table.boxes()
    actions = table.numbers(6, "action_id", integer=True).astype(np.int64)
    persons = (table.numbers(7, "person_id", integer=True).astype(np.int64) if table.width == 8
               else np.full(n, -1, dtype=np.int64))
    listed = np.ones(n, dtype=bool)
    if label_ids is not None:
        allowed = np.fromiter(set(label_ids), dtype=np.int64)
        listed = np.isin(actions, allowed)
        unknown = ~listed & ~np.isin(actions, np.fromiter(AVA_ACTION_IDS, dtype=np.int64))
        if unknown.any():
            i = int(np.argmax(unknown))
            raise ConfigError(f"{path}:{table.line(i)}: action_id: unknown label id {actions[i]} (not in the label map "
                              f"nor among AVA's actions 1..80)")
        stats.unlisted_rows = int((~listed).sum())
    boxes, changed = clip_boxes(raw)
    keep = valid_boxes(boxes)
    vid, names = table.video_codes()
    # One group per distinct box (keyframe, person, coordinates), numbered in order of appearance.
    group = _groups(vid, ts, persons, *raw.T)
    first = np.full(int(group.max(initial=-1)) + 1, n, dtype=np.int64)
    np.minimum.at(first, group, np.arange(n))  # each box's first row
    stats.degenerate = int((~keep[first]).sum())  # counted per distinct box, not per row
    stats.clipped = int((changed[first] & keep[first]).sum())
    # Actions per box, sorted; the boxes of a keyframe in order of appearance, keyframes likewise.
    span = int(actions.max(initial=0)) + 1
    pairs = np.sort((group * span + actions)[keep & listed])
    pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]] if len(pairs) else pairs
    ends = np.cumsum(np.bincount(pairs // span, minlength=len(first))).tolist()
    acts = (pairs % span).tolist()
    labels = [tuple(acts[s:e]) for s, e in zip([0, *ends[:-1]], ends)]
    kept = np.flatnonzero(keep[first])
    rows_of = first[kept]
    frame = _groups(vid[rows_of], ts[rows_of])  # keyframes in order of their first kept box
    by_frame = np.argsort(frame, kind="stable")
    kept, rows_of, frame = kept[by_frame], rows_of[by_frame], frame[by_frame]
    starts = np.flatnonzero(np.r_[True, frame[1:] != frame[:-1]]).tolist() if len(frame) else []
    box32 = boxes[rows_of].astype(np.float32)
    person_of = persons[rows_of].tolist()
    out = KeyframeTable(stats=stats)
    for s, e in zip(starts, [*starts[1:], len(kept)]):
        r = rows_of[s]
        out[(names[vid[r]], int(ts[r]))] = KeyframeBoxes(boxes=box32[s:e], person_ids=tuple(person_of[s:e]),
                                                         labels=tuple(labels[g] for g in kept[s:e].tolist()))
    stats.keyframes, stats.boxes = len(out), len(kept)
    return out


def read_proposals(path: str | Path, min_score: float = 0.0) -> KeyframeTable:
    """Person boxes -> ``{(video, ts): (N, 5) float32 [x1, y1, x2, y2, score]}`` with ``score >= min_score``.

    A CSV with the first six AVA columns and the score in the 8th (``vid, ts, x1, y1, x2, y2, , score``, as
    the public predicted-box files leave the 7th empty) or the 7th; or mmaction2's pickle (``'vid,0902' ->
    N x [x1, y1, x2, y2, score]``), read without running any code it may carry. A keyframe whose boxes are
    all below the threshold stays, with no boxes. Repeated boxes of a keyframe (one row per action in
    detection-style files) are kept once, with their highest score."""
    path = Path(path)
    if path.suffix in (".pkl", ".pickle") or _starts_like_pickle(path):
        frames, stats = _read_proposal_pickle(path)
    else:
        frames, stats = _read_proposal_csv(path)
    table = KeyframeTable(stats=stats)
    for frame, rows in frames.items():
        rows = rows[np.lexsort((-rows[:, 4],) + tuple(rows[:, c] for c in range(3, -1, -1)))]
        first = np.ones(len(rows), dtype=bool)
        first[1:] = np.any(rows[1:, :4] != rows[:-1, :4], axis=1)
        rows = rows[first]
        boxes, keep = _fix_boxes(rows[:, :4], stats)
        rows = np.concatenate([boxes, rows[:, 4:5]], axis=1)[keep]
        above = rows[:, 4] >= min_score
        stats.below_score += int((~above).sum())
        rows = rows[above]
        table[frame] = rows[np.argsort(-rows[:, 4], kind="stable")].astype(np.float32)
        stats.boxes += len(rows)
    stats.keyframes = len(table)
    return table


def _read_proposal_csv(path: Path) -> tuple[dict[tuple[str, int], np.ndarray], ReadStats]:
    table = CsvTable(path, "proposals", (7, 8), "video_id, timestamp, x1, y1, x2, y2, [action_id,] score")
    ts = table.numbers(1, "timestamp", integer=True).astype(np.int64).tolist()
    data = np.concatenate([table.boxes(), table.numbers(table.width - 1, "score")[:, None]], axis=1)
    order: dict[tuple[str, int], list[int]] = {}
    for i, frame in enumerate(zip(table.ids, ts)):
        order.setdefault(frame, []).append(i)
    return {frame: data[idx] for frame, idx in order.items()}, ReadStats(str(path), rows=len(table))


# numpy's array reconstruction (numpy 1 and 2 module names) and nothing else: a proposal file a user hands
# us must not be able to run code when it is read.
_PICKLE_GLOBALS = frozenset({
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict"),
})


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 2 warns on the old name
        return super().find_class(module, name)


def _starts_like_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"
    except OSError:
        return False


def _read_proposal_pickle(path: Path) -> tuple[dict[tuple[str, int], np.ndarray], ReadStats]:
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f).load()
    except FileNotFoundError:
        raise ConfigError(f"{path}: proposals file not found") from None
    except Exception as e:  # any malformed byte stream: pickle raises many kinds
        raise ConfigError(f"{path}: not a proposals pickle ({' '.join(str(e).split()) or type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a dict 'video_id,timestamp' -> N x [x1, y1, x2, y2, score], "
                          f"got {type(data).__name__}")
    frames, rows = {}, 0
    for key, value in data.items():
        try:
            frame = parse_keyframe_id(key)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            arr = None
        if arr is not None and arr.size == 0:
            arr = arr.reshape(0, 5)
        if arr is None or arr.ndim != 2 or arr.shape[1] != 5 or not np.isfinite(arr).all():
            raise ConfigError(f"{path}: {key}: expected an N x 5 array of finite [x1, y1, x2, y2, score]")
        frames[frame] = arr
        rows += len(arr)
    return frames, ReadStats(str(path), rows=rows)


# ---------------------------------------------------------------------------------------------- one split

@dataclass(frozen=True)
class AvaSplit:
    """Everything a detect stage reads of one split of an AVA-layout dataset; excluded keyframes are gone
    from ``gt``, ``proposals`` and ``keyframes`` alike."""

    name: str
    labelmap: dict[int, str]
    gt: KeyframeTable  # empty for a split without annotations (AVA's test set)
    proposals: KeyframeTable | None
    exclusions: set[tuple[str, int]]
    keyframes: dict[str, tuple[int, ...]]  # video -> sorted timestamps: GT plus proposal keyframes
    timestamp_offset_s: float = 0.0
    stats: tuple[ReadStats, ...] = field(default=())

    def time_in_video(self, timestamp: int) -> float:
        """Seconds from the start of the video file to the keyframe (AVA timestamps count from the film's
        start; the 15-minute cuts start at 900 s)."""
        return timestamp - self.timestamp_offset_s

    def log_lines(self) -> list[str]:
        return [s.summary() for s in self.stats]


def load_split(manifest, split_name: str, min_score: float = 0.0) -> AvaSplit:
    """One split of a detect dataset (``pipeline.datasets.Dataset`` or its ``AvaLayout``), by split name
    (a key of ``annotations:`` / ``proposals:``) or by role (a key of ``splits:``)."""
    layout = getattr(manifest, "ava", manifest)
    if layout is None:
        raise ConfigError(f"{getattr(manifest, 'path', manifest)}: not a detect dataset (no AVA layout)")
    split = layout.resolve_split(split_name)
    labelmap = read_labelmap(layout.labelmap)
    exclusions = read_exclusions(layout.exclusions[split]) if split in layout.exclusions else set()
    gt = (read_boxes(layout.annotations[split], set(labelmap)) if split in layout.annotations
          else KeyframeTable(stats=None))
    proposals = read_proposals(layout.proposals[split], min_score) if split in layout.proposals else None
    for table in (gt, proposals):
        if table is not None and table.stats is not None:
            excluded = [k for k in table if k in exclusions]
            for k in excluded:
                del table[k]
            table.stats.excluded = len(excluded)
            table.stats.keyframes = len(table)
            table.stats.boxes = sum(len(getattr(v, "boxes", v)) for v in table.values())
    frames = set(gt) | set(proposals or ())
    keyframes: dict[str, list[int]] = {}
    for video, ts in sorted(frames):
        keyframes.setdefault(video, []).append(ts)
    return AvaSplit(name=split, labelmap=labelmap, gt=gt, proposals=proposals, exclusions=exclusions,
                    keyframes={v: tuple(t) for v, t in keyframes.items()},
                    timestamp_offset_s=layout.timestamp_offset_s,
                    stats=tuple(t.stats for t in (gt, proposals) if t is not None and t.stats is not None))
