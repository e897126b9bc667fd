"""Writing a local file whole: write a temporary sibling, then rename it onto the target, so that a
reader (or a crash) never sees half a file. The one atomic write of the package: the run root's
local store, the demo's cache and timm's cached name lists all write through it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from ray_consensus.storage.listing import TEMP_PREFIX


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` with the path of a temporary file beside `path` (named with `TEMP_PREFIX`, so no
    listing sees it), then rename it onto `path`; on any error the temporary file is removed and the
    error raised. Parent folders are made as needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
