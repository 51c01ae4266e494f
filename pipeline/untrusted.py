"""Reading files a user hands us without running code from them.

A pickle can call any importable function while it loads. Checkpoints are read with
``torch.load(weights_only=True)`` (tensors, numbers, strings and containers only) and pickled feature
files with an unpickler that knows only numpy arrays; a file that needs more is refused with a
message that says what it asked for.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Iterable

from pipeline.errors import ConfigError

_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
# What a pickled numpy array (numpy 1 and 2) and a plain dict of them need, nothing more.
_NUMPY = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
          ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
          ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}


def refusal(path: Path | str, asked: str) -> ConfigError:
    return ConfigError(f"{path}: refused: loading it would run code named in the file ({asked}); only "
                       f"tensors, arrays, numbers, strings and containers are read from user files "
                       f"(re-save the weights as a plain state dict)")


def load_torch(path: Path | str, allow: Iterable[type] = ()) -> object:
    """``torch.load`` on CPU, weights only (plus the ``allow``-ed classes). ConfigError (one line) for
    a file that is not a checkpoint or would need code to load."""
    import torch

    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found:
            raise refusal(path, found.group(1)) from None
        raise _not_a_checkpoint(path, exc) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except Exception as exc:  # torch raises several types for foreign or corrupt files
        raise _not_a_checkpoint(path, exc) from None


def _not_a_checkpoint(path, exc: Exception) -> ConfigError:
    text = str(exc).strip()
    # torch's weights-only errors bury the cause after a paragraph of advice
    text = text.split("WeightsUnpickler error:", 1)[-1].strip()
    first = text.splitlines()[0] if text else ""
    return ConfigError(f"{path}: cannot read as a PyTorch checkpoint: {type(exc).__name__}"
                       + (f": {first}" if first else ""))


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def load_pickle(path: Path | str) -> object:
    """A pickle of numpy arrays, lists and dicts; anything else is refused (ConfigError)."""
    try:
        with open(path, "rb") as f:
            return _NumpyUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        if re.fullmatch(r"[\w.]+\.\w+", str(exc)):
            raise refusal(path, str(exc)) from None
        raise ConfigError(f"{path}: not a readable pickle: {exc}") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise ConfigError(f"{path}: not a readable pickle: {type(exc).__name__}: {exc}") from None
