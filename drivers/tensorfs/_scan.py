"""The boot scan: one walk of the whole store, in a thread of its own, started once
the driver is ready, so that the time to ready does not grow with the store. It
removes what crashed writes of earlier instances left (temporary files and
directories named with another instance's tag) and counts each owner's bytes,
which the quota checks need.

The loop thread goes on changing the tree meanwhile. Both hold `lock` around each
step: the scan while it lists one directory or reads one file's header, the loop
thread (the Store, _commit.py) while it renames, links or unlinks one tensor file
and accounts for it. The loop thread accounts a change only where the scan will
not read it (pending()), so the scan's counts plus the changes accounted are each
owner's bytes exactly. A directory's rename moves files across the scan's front,
which pending() cannot follow: it waits until the scan is done (_driver.py).

It must never touch the socket (its end is handed to the loop thread, which
merges the counts), never remove a temporary file of this instance, and never
import the kernel or userland.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ._format import SUFFIX, FormatError
from ._paths import TMP_PREFIX, file_meta

log = logging.getLogger("llmos.tensorfs")


def remove_tree(p: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(p, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            os.rmdir(os.path.join(dirpath, name))
    os.rmdir(p)


@dataclass
class Frame:
    """A directory the walk is in: the entries it will visit as listed (tensor
    files and directories), in name order; the first i of them are visited,
    order[i - 1] last. leftovers: (name, is a directory) of earlier instances'
    temporary files, to remove."""
    path: Path
    order: list[str]
    dirs: set[str]
    leftovers: list[tuple[str, bool]]
    names: set[str] = field(init=False)
    i: int = 0

    def __post_init__(self) -> None:
        self.names = set(self.order)

    @property
    def at(self) -> str | None:
        return self.order[self.i - 1] if self.i else None


class Scan:
    """The walk's state. Under `lock`: frames (the directories it is in, the
    root's first; empty before the root is listed and after the walk), each
    frame's i, walked. `counted` is the scan thread's until walked."""

    def __init__(self, root: Path, own_tmp: str) -> None:
        self.root = root
        self.own_tmp = own_tmp          # this instance's temporary names start so
        self.lock = threading.Lock()
        self.frames: list[Frame] = []
        self.walked = False             # the walk is over (the scan's thread)
        self.done = False               # and its counts are merged (the loop's thread)
        self.stopping = False
        self.counted: dict[int, int] = {}
        self.files = self.dirs = self.leftovers = self.unreadable = 0
        self.started = time.monotonic()
        self.seconds: float | None = None
        self.thread: threading.Thread | None = None

    def start(self, walked: Callable[[], None]) -> None:
        """Walk the store in a thread of its own, which then calls walked(): its
        last act, which must only hand over to the loop thread (loop.post)."""
        def run() -> None:
            try:
                self.walk()
            except Exception:  # the counts are short: quotas are lenient until restart
                log.exception("the scan of %s failed", self.root)
            finally:
                self.finish()
                walked()

        self.thread = threading.Thread(target=run, name="tensorfs-scan", daemon=True)
        self.thread.start()

    def walk(self) -> None:
        with self.lock:
            self.enter(self.root)
        while self.frames and not self.stopping:
            self.step(self.frames[-1])

    def finish(self) -> None:
        """The walk is over: from now on every change is the loop thread's to count."""
        with self.lock:
            self.walked = True
            self.frames.clear()
        self.seconds = time.monotonic() - self.started
        log.info("scanned %s in %.2f s: %d tensor files in %d directories, %d "
                 "unreadable, %d crash leftover(s) removed", self.root, self.seconds,
                 self.files, self.dirs, self.unreadable, self.leftovers)

    def stop(self) -> None:
        self.stopping = True
        if self.thread is not None:
            self.thread.join(5.0)

    def step(self, f: Frame) -> None:
        """Visit f's next entry, or leave f when it has none left."""
        while f.leftovers:  # nothing counts them: no lock needed
            name, is_dir = f.leftovers.pop()
            self.remove_leftover(f.path / name, is_dir)
        if f.i == len(f.order):
            with self.lock:
                self.frames.pop()
                self.walked = not self.frames  # out of the root: nothing is pending
            return
        name = f.order[f.i]
        with self.lock:
            f.i += 1
            if name in f.dirs:
                self.enter(f.path / name)
            else:
                self.count(f.path / name)

    def enter(self, d: Path) -> None:
        """List directory d and walk into it (lock held). The driver's own dot
        files are not visited, nor anything but directories and tensor files (a
        FIFO would block the open)."""
        try:
            with os.scandir(d) as it:
                entries = sorted((e.name, e.is_dir(follow_symlinks=False),
                                  e.is_file(follow_symlinks=False)) for e in it)
        except FileNotFoundError:
            return  # removed since its parent was listed
        except OSError as e:
            log.error("scan: %s: %s", d, e)
            return
        order = [n for n, is_dir, is_file in entries if not n.startswith(".") and (
            is_dir or (is_file and n.endswith(SUFFIX)))]
        leftovers = [(n, is_dir) for n, is_dir, _ in entries
                     if n.startswith(TMP_PREFIX) and not n.startswith(self.own_tmp)]
        self.frames.append(Frame(d, order, {n for n, is_dir, _ in entries if is_dir},
                                 leftovers))
        self.dirs += 1

    def count(self, p: Path) -> None:
        try:
            meta = file_meta(p)
        except FileNotFoundError:
            return
        except (OSError, FormatError) as e:
            self.unreadable += 1
            log.error("%s: %s", p, e)
            return
        self.counted[meta.owner] = self.counted.get(meta.owner, 0) + meta.nbytes
        self.files += 1

    def remove_leftover(self, p: Path, is_dir: bool) -> None:
        try:
            if is_dir:  # a mkdir or unlink cut short
                remove_tree(p)
            else:
                os.unlink(p)
            self.leftovers += 1
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("removing the crash leftover %s: %s", p, e)

    def pending(self, p: Path) -> bool:
        """Whether the scan will still read the tensor file p: its name is in the
        listing of the deepest directory of the walk on its way, after the walk's
        place there. Call it holding lock."""
        if self.walked:
            return False
        if not self.frames:
            return True  # the root is not listed yet
        rel = p.relative_to(self.root).parts
        for depth, f in enumerate(self.frames):
            name = rel[depth]
            if depth + 1 < len(self.frames) and depth + 1 < len(rel) and name == f.at:
                continue  # in the directory the walk is in: look there
            return name in f.names and (f.at is None or name > f.at)
        return False

    def summary(self) -> dict[str, Any]:
        elapsed = self.seconds if self.seconds is not None else \
            time.monotonic() - self.started
        return {"done": self.done, "files": self.files, "dirs": self.dirs,
                "unreadable": self.unreadable, "leftovers": self.leftovers,
                "seconds": round(elapsed, 3)}
