"""fsck: every stored tensor checked against its own header, and damaged files
moved aside.

check() runs in the driver's background thread and only reads: for each tensor
or group file under a directory it verifies the header, the file's size (header
plus data, exactly) and the data's CRC-32. repair() runs on the loop thread: it
moves each damaged file, if it is still the very file checked (same inode), into
lost+found at the store's root (root's, mode 0700), named after the path it had,
through the Store, so usage and a running scan stay right. An unreadable header
does not stop the move: the Store moves a file it cannot read as such. It must
never change a file it did not find damaged, never follow a symbolic link, and
never import the kernel or userland.
"""
from __future__ import annotations

import hashlib
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ._commit import Store
from ._format import SUFFIX, FormatError, TensorMeta, read_meta
from ._paths import MAX_NAME, DirMeta

LOST_FOUND = "lost+found"
LOST_FOUND_MODE = 0o700   # damaged files of every owner: for uid 0's eyes only
CHUNK = 16 << 20          # bytes read at a time for the checksum


@dataclass
class Damaged:
    path: str                       # its llmos path
    file: Path
    why: str
    ident: tuple[int, int]          # (device, inode) of the file checked
    meta: TensorMeta | None         # its header, if readable


def tensor_files(d: Path, path: str, skip: str | None = None) -> Iterator[tuple[Path, str]]:
    """(file, llmos path) of every tensor file under directory d (llmos path
    path), in name order; not the driver's own dot files, nor the entry skip."""
    base = path.rstrip("/")
    try:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        return  # removed since its parent was listed
    for e in entries:
        if e.name.startswith(".") or e.name == skip:
            continue
        if e.is_dir(follow_symlinks=False):
            yield from tensor_files(Path(e.path), f"{base}/{e.name}")
        elif e.name.endswith(SUFFIX) and e.is_file(follow_symlinks=False):
            yield Path(e.path), f"{base}/{e.name[:-len(SUFFIX)]}"


def crc_of(fd: int, offset: int, n: int) -> int:
    buf = memoryview(bytearray(min(n, CHUNK)))
    crc, done = 0, 0
    while done < n:
        got = os.preadv(fd, [buf[:min(CHUNK, n - done)]], offset + done)
        if got <= 0:
            raise OSError(f"the file ends {n - done} bytes early")
        crc = zlib.crc32(buf[:got], crc)
        done += got
    return crc


def verify(p: Path) -> tuple[str | None, TensorMeta | None, tuple[int, int]]:
    """(why p is damaged, or None; its header; its identity)."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        return f"cannot be opened: {e.strerror}", None, (0, 0)
    try:
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        try:
            meta = read_meta(fd)
        except FormatError as e:
            return f"header: {e}", None, ident
        end = meta.data_offset + meta.nbytes
        if st.st_size != end:
            return (f"{'truncated' if st.st_size < end else 'too long'}: the file is "
                    f"{st.st_size} bytes, its header says {end}"), meta, ident
        crc = crc_of(fd, meta.data_offset, meta.nbytes)
        if crc != meta.crc32:
            return (f"data: its CRC-32 is {crc:08x}, its header says {meta.crc32:08x}",
                    meta, ident)
        return None, meta, ident
    except OSError as e:
        return f"unreadable: {e}", None, (0, 0)
    finally:
        os.close(fd)


def check(root: Path, start: Path, path: str, is_dir: bool) -> tuple[int, list[Damaged]]:
    """Verify every tensor file at or under start (llmos path path): (how many were
    checked, the damaged ones). Walking from the root, lost+found is left out."""
    files = tensor_files(start, path, LOST_FOUND if start == root else None) \
        if is_dir else iter([(start, path)])
    checked, damaged = 0, []
    for p, tpath in files:
        checked += 1
        why, meta, ident = verify(p)
        if why is not None:
            damaged.append(Damaged(tpath, p, why, ident, meta))
    return checked, damaged


def aside_name(lost: Path, path: str) -> str:
    """A free name in lost+found that says where path was: its components joined
    by %2F (% itself as %25); a long one keeps its end, after a hash of it all."""
    name = path[1:].replace("%", "%25").replace("/", "%2F")
    if len(name.encode()) > MAX_NAME - 16:
        tail = name.encode()[-(MAX_NAME - 32):].decode(errors="ignore")
        name = f"{hashlib.sha256(path.encode()).hexdigest()[:12]}-{tail}"
    free, n = name, 1
    while (lost / free).exists() or (lost / (free + SUFFIX)).exists():
        free, n = f"{name}~{n}", n + 1
    return free


def repair(store: Store, damaged: list[Damaged]) -> list[dict[str, Any]]:
    """Move each damaged file still in place (and not in lost+found already) into
    lost+found: [{path, to}] of those moved."""
    root = store.ns.root
    lost = root / LOST_FOUND
    moved = []
    for d in damaged:
        if lost in d.file.parents:
            continue
        try:
            st = os.lstat(d.file)
        except FileNotFoundError:
            continue  # removed since the check
        if (st.st_dev, st.st_ino) != d.ident:
            continue  # replaced since: not the file found damaged
        if not lost.is_dir():
            store.make_dir(root, LOST_FOUND, DirMeta(0, LOST_FOUND_MODE, time.time()))
        name = aside_name(lost, d.path)
        store.move(d.file, lost / (name + SUFFIX), d.meta)
        moved.append({"path": d.path, "to": f"/{LOST_FOUND}/{name}"})
    return moved
