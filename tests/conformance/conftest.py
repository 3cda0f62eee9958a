"""The conformance suite's fixtures and its errno recorder.

Every error reply the userland library receives in this process while a
conformance test runs is recorded as (syscall number, errno); test_zz_coverage,
ordered after every other conformance test, compares them with the contracts in
syscalls/_table.py. This works with `pytest tests/conformance` alone and in the
whole suite; when only part of the conformance suite is selected, the coverage
check skips instead of reporting what was never run."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from conftest import Booted

from ._util import RECORDER, SHARED_CONFIG, install_recorder

HERE = Path(__file__).resolve().parent
COVERAGE = "test_zz_coverage.py"

install_recorder()


def _mine(item: pytest.Item) -> bool:
    return Path(str(item.path)).resolve().parent == HERE


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Run the coverage check after every other conformance test."""
    cov = [i for i in items if _mine(i) and i.path.name == COVERAGE]
    if not cov:
        return
    rest = [i for i in items if i not in cov]
    last = max((n for n, i in enumerate(rest) if _mine(i)), default=len(rest) - 1)
    items[:] = rest[:last + 1] + cov + rest[last + 1:]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Note which conformance modules run (not counting slow-marked tests), so
    the coverage check knows whether it sees the whole suite."""
    RECORDER.collected = {i.path.name for i in session.items
                          if _mine(i) and i.get_closest_marker("slow") is None}


@pytest.fixture(autouse=True)
def _record_errnos(request: pytest.FixtureRequest) -> Iterator[None]:
    RECORDER.active = True
    try:
        yield
    finally:
        RECORDER.active = False
        RECORDER.tests.add(request.node.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """With LLMOS_CONFORMANCE_SHOW=1: the (syscall, errno) pairs produced."""
    if os.environ.get("LLMOS_CONFORMANCE_SHOW") and RECORDER.seen:
        from syscalls import BY_NUMBER, Errno
        pairs = sorted(f"{BY_NUMBER[n].name if n in BY_NUMBER else n}:{Errno(e).name}"
                       for n, e in RECORDER.seen)
        terminalreporter.write_line(f"conformance produced {len(pairs)} (syscall, errno) "
                                    f"pairs: {' '.join(pairs)}")


@pytest.fixture(scope="package")
def system() -> Iterator[Booted]:
    """The kernel, with every driver, that the conformance machines share. Each
    machine leaves it as it found it (no processes, allocations or files of its own)."""
    b = Booted(SHARED_CONFIG)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="package")
def root(system: Booted) -> Iterator:
    """A uid-0 handle for set-up and for looking at the whole system."""
    with system.connect(uid=0) as osh:
        yield osh


TINY_MODEL = "/models/tiny"


@pytest.fixture(scope="package")
def tiny_model(system: Booted) -> str:
    """A tiny GPT checkpoint at /models/tiny, uid 1000's, readable by all."""
    from test_executor import write_model
    with system.connect(uid=1000) as osh:
        write_model(osh, TINY_MODEL)
    return TINY_MODEL
