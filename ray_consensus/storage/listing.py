"""Listing a local folder tree fast: the walk `LocalStore` lists with, and the same walk in a process
of its own, so that listing a big run root overlaps the planning that needs it.

Listing a local run root is bound by the kernel, not by Python: on these 2 cores `find` needs 4.4 s
for the 316,467 unit folders of a million images x 80 members, and a thread of the planning process
makes it slower still (GIL handovers after every directory). A child process lists while the parent
hashes fingerprints. This module imports only the standard library: the child runs it as a script
(`python listing.py ROOT NAME_START SIZED PREFIX...`, SIZED the names to size joined by '/', one
`rel\\n` or `rel\\tsize\\n` line per file found on stdout), without
the package's imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Callable

TEMP_PREFIX = ".tmp-"  # files being written (renamed into place when whole): never listed


def walk(base: str, rel: str, name_start: str = "", sized: tuple[str, ...] = ()) -> list[str]:
    """Relative paths ('/'-separated, starting with `rel`) of the files under the folder `base` whose
    names start with `name_start`, unsorted; files named one of `sized` come too, as `path<TAB>size`
    (one stat each: the other files cost none). os.scandir: ~5x Path.rglob on a run root of 300k units."""
    out: list[str] = []

    def visit(path: str, prefix: str) -> None:
        with os.scandir(path) as entries:
            for e in entries:
                name = f"{prefix}/{e.name}" if prefix else e.name
                if e.is_dir(follow_symlinks=False):
                    visit(e.path, name)
                elif e.name in sized:
                    out.append(f"{name}\t{e.stat(follow_symlinks=False).st_size}")
                elif e.name.startswith(name_start) and not e.name.startswith(TEMP_PREFIX):
                    out.append(name)

    if os.path.isdir(base):
        visit(base, rel)
    return out


def walk_later(root: str, prefixes: list[str], name_start: str = "", sized: tuple[str, ...] = ()
               ) -> Callable[[], list[str]]:
    """Start walking `root`/prefix for each prefix in a child process; returns a function that waits
    for it and gives the files, as `walk` would (a failed child raises OSError there)."""
    out = tempfile.TemporaryFile()
    child = subprocess.Popen([sys.executable, "-S", os.path.abspath(__file__), root, name_start, "/".join(sized),
                              *prefixes], stdout=out, stderr=subprocess.PIPE)

    def result() -> list[str]:
        _, err = child.communicate()
        if child.returncode != 0:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
            raise OSError(f"listing {root} failed: {last[0]}")
        out.seek(0)
        text = out.read().decode()
        out.close()
        return text.split("\n")[:-1] if text else []

    return result


def _main(argv: list[str]) -> None:
    root, name_start, sized, *prefixes = argv
    write = sys.stdout.write
    for prefix in prefixes:
        files = walk(os.path.join(root, prefix), prefix, name_start, tuple(sized.split("/")) if sized else ())
        if files:
            write("\n".join(files) + "\n")


if __name__ == "__main__":
    _main(sys.argv[1:])
