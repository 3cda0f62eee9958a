"""Text to train on: files' bytes, or by default this Python's standard library
sources (every Python install has them: offline, and about 30 MB of real code).

Used by `llmos corpus` and by the benchmarks that train without llmos.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator


def stdlib_files() -> Iterator[Path]:
    """The .py files of this interpreter's standard library, in a stable order."""
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" not in path.parts and "test" not in path.parts:
            yield path


def expand(files: list[Path]) -> Iterator[Path]:
    """The files named, a directory standing for the files under it (sorted)."""
    for path in files:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def read_corpus(files: list[Path] | None, max_bytes: int) -> bytes:
    """The files' bytes (a directory: the files under it), up to max_bytes; files
    named explicitly must be readable (OSError), the standard library's unreadable
    ones are skipped."""
    out = bytearray()
    for path in expand(files) if files else stdlib_files():
        try:
            out += path.read_bytes()
        except OSError:
            if files:
                raise
            continue
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])
