"""Progress bars on anything that loops over items; quiet when stderr is not a terminal."""

from __future__ import annotations

import os
import sys


def progress(iterable=None, total=None, desc="", unit="it", **kwargs):
    from tqdm import tqdm

    quiet = not sys.stderr.isatty() or os.environ.get("PIPELINE_NO_PROGRESS")
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=bool(quiet), dynamic_ncols=True,
                leave=False, **kwargs)
