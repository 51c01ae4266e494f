"""Reading public checkpoint files and loading them strictly into our modules (backbones, detection heads).

A published checkpoint differs from our modules in three ways only: a container around the state dict
(``model``, ``module``, ``state_dict``, ``model_state``, ``state_dict_ema``), key names (prefixes such as
``module.`` / ``features.``, other naming schemes) and heads we do not use. A ``KeyFormat`` describes one
public naming scheme; ``load_weights`` picks the format that fits the file best, converts the keys and
loads them strictly, raising one ``ConfigError`` that names every missing, unexpected and mis-shaped key.
Nothing is ever downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import ConfigError

DEFAULT_CONTAINERS = ("model_state", "model", "module", "state_dict", "state_dict_ema")

# BatchNorm back-fills this buffer when a checkpoint lacks it (files written before PyTorch 0.4.1,
# e.g. the 2018 I3D ones) and its value never affects eval-mode outputs, so it is optional both ways.
_OPTIONAL_SUFFIX = ".num_batches_tracked"


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB checkpoints never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | Path, *, needed: str) -> object:
    """``torch.load`` a local file on CPU without executing pickled code.

    ``needed`` says which public file is expected and where it is published; it is part of the error
    when the file is missing. ``argparse.Namespace`` is allowed because TSP and VideoMAE store their
    training arguments beside the weights.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint file not found; needed: {needed} (nothing is downloaded)")
    from pipeline.untrusted import load_torch

    return load_torch(path, allow=[argparse.Namespace])


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def unwrap_state_dict(obj: object, containers: Sequence[str] = DEFAULT_CONTAINERS, *,
                      source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside ``obj``, descending through the first container key present at each level."""
    seen = []
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping):
            raise ConfigError(f"{source}: expected a state dict, found {type(obj).__name__}")
        inner = next((k for k in containers if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            top = ", ".join(map(str, list(obj)[:12]))
            raise ConfigError(f"{source}: no state dict found under {'/'.join(seen) or 'the top level'} "
                              f"(keys: {top}; looked for {', '.join(containers)})")
        seen.append(inner)
        obj = obj[inner]
    return dict(obj)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from the keys that carry it; other keys are kept as they are."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def rename_key(key: str, rules: Sequence[tuple[str, str]]) -> str:
    """Apply ordered regex substitutions ``(pattern, replacement)`` to one key."""
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def apply_key_map(state_dict: Mapping[str, torch.Tensor],
                  rules: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Rename every key of a state dict with ``rename_key``."""
    return {rename_key(k, rules): v for k, v in state_dict.items()}


@dataclass(frozen=True)
class KeyFormat:
    """One public naming scheme of a backbone's weights.

    Conversion order: keys matching ``drop`` (regexes, ``re.match`` on the key as stored, after a
    ``module.`` prefix that every key carries is removed) are set aside (heads we do not use); then
    ``prefixes`` are stripped; then ``rename`` rules map the public names to our module names.
    """

    name: str
    drop: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()

    def model_key(self, key: str) -> str:
        for prefix in self.prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        return rename_key(key, self.rename)

    def convert(self, state_dict: Mapping[str, torch.Tensor]):
        """(converted state dict, dropped keys, model key -> key as stored in the file)."""
        if state_dict and all(k.startswith("module.") for k in state_dict):
            state_dict = strip_prefix(state_dict, "module.")
        dropped = [k for k in state_dict if any(re.match(p, k) for p in self.drop)]
        skip = set(dropped)
        origin = {self.model_key(k): k for k in state_dict if k not in skip}
        return {new: state_dict[old] for new, old in origin.items()}, dropped, origin


@dataclass(frozen=True)
class LoadReport:
    """What ``load_weights`` did: file digest, the format it matched and the keys it set aside."""

    path: str
    sha256: str
    format: str
    dropped: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # non-strict only: keys not loaded and why


def _optional(key: str) -> bool:
    return key.endswith(_OPTIONAL_SUFFIX)


def _score(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> tuple[int, int]:
    """(keys present in both, of those with equal shapes): the overlap that ranks layouts."""
    common = [k for k in converted if k in expected and not _optional(k)]
    return len(common), sum(tuple(converted[k].shape) == tuple(expected[k]) for k in common)


def nearest_format(state_dict: Mapping[str, torch.Tensor], formats: Sequence[KeyFormat],
                   expected: Mapping[str, torch.Size]):
    """The format whose converted key set overlaps the model's most:
    (format, converted, dropped, origin, (keys in common, of those with equal shapes))."""
    best = None
    for fmt in formats:
        converted, dropped, origin = fmt.convert(state_dict)
        score = _score(converted, expected)
        if best is None or score > best[-1]:
            best = (fmt, converted, dropped, origin, score)
    return best


def mismatch_report(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size],
                    origin: Mapping[str, str] | None = None):
    """(missing, unexpected, shape mismatches), each sorted. Missing keys carry the model's names;
    unexpected and mis-shaped ones the names in the file, with the model name when it differs."""
    origin = origin or {}

    def stored(key: str) -> str:
        old = origin.get(key, key)
        return old if old == key else f"{old} (as {key})"

    missing = sorted(k for k in expected if k not in converted and not _optional(k))
    unexpected = sorted(stored(k) for k in converted if k not in expected and not _optional(k))
    shapes = sorted(
        f"{stored(k)} checkpoint {list(converted[k].shape)} vs model {list(expected[k])}"
        for k in converted if k in expected and tuple(converted[k].shape) != tuple(expected[k])
    )
    return missing, unexpected, shapes


def _describe(missing: Iterable[str], unexpected: Iterable[str], shapes: Iterable[str]) -> str:
    parts = []
    for title, items in (("missing", list(missing)), ("unexpected", list(unexpected)),
                         ("shape mismatch", list(shapes))):
        if items:
            parts.append(f"{title} ({len(items)}): {', '.join(items)}")
    return "; ".join(parts)


def load_state_dict_checked(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                            formats: Sequence[KeyFormat], *, source: str, target: str,
                            strict: bool = True) -> tuple[str, list[str], list[str]]:
    """Convert ``state_dict`` with the best-fitting format and copy it into ``model``.

    ``target`` names what is being loaded (e.g. ``i3d rgb``) in messages. Strict: any missing,
    unexpected or mis-shaped key raises one ``ConfigError`` naming all of them and the nearest known
    layout. Non-strict: loads the keys that fit and returns the rest as ``skipped``.
    Returns (format name, dropped head keys, skipped keys).
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    fmt, converted, dropped, origin, (_, n_same) = nearest_format(state_dict, formats, expected)
    missing, unexpected, shapes = mismatch_report(converted, expected, origin)
    n_required = sum(not _optional(k) for k in expected)
    if strict and (missing or unexpected or shapes):
        known = ", ".join(f.name for f in formats)
        raise ConfigError(
            f"{source}: does not fit {target} "
            f"(nearest known layout: {fmt.name}, {n_same} of {n_required} model keys match; known: {known}): "
            + _describe(missing, unexpected, shapes))
    loadable = {k: v for k, v in converted.items()
                if k in expected and tuple(v.shape) == tuple(expected[k])}
    model.load_state_dict(loadable, strict=False)
    skipped = [f"{k} (missing)" for k in missing] + [f"{k} (unexpected)" for k in unexpected] + \
              [f"{s} (shape)" for s in shapes]
    return fmt.name, dropped, skipped


def load_weights(model: torch.nn.Module, path: str | Path, formats: Sequence[KeyFormat], *,
                 needed: str, target: str, strict: bool = True,
                 containers: Sequence[str] = DEFAULT_CONTAINERS,
                 check: Callable[[dict[str, torch.Tensor]], None] | None = None) -> LoadReport:
    """Read a local checkpoint file, unwrap, convert and load it (see ``load_state_dict_checked``).

    ``check`` sees the unwrapped state dict, keys as stored, before conversion: a backbone's own
    validation of entries the key formats set aside (it raises ``ConfigError``)."""
    obj = read_checkpoint(path, needed=needed)
    state_dict = unwrap_state_dict(obj, containers, source=str(path))
    if check is not None:
        check(state_dict)
    fmt, dropped, skipped = load_state_dict_checked(model, state_dict, formats, source=str(path),
                                                    target=target, strict=strict)
    return LoadReport(path=str(path), sha256=sha256_file(path), format=fmt,
                      dropped=tuple(dropped), skipped=tuple(skipped))
