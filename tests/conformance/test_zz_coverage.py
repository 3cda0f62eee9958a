"""Every errno a contract lists must be produced by some conformance test.

The contracts are syscalls/_table.py's (errno, when) pairs, and the errors every
call can get (syscalls/gen.py GENERIC_ERRORS). Required, as (syscall, errno):

- each syscall's own errors;
- EPROTO and EINVAL for every syscall, ENOTCONN for every syscall but attach (cheap
  sweeps: test_targeted.py), EAGAIN for every syscall a driver serves, E2BIG for
  every syscall with a bytes argument;
- ENOSYS, EIO and the E2BIG of a reply too big at least once (an unknown number; a
  driver that died mid-call; a huge ps). POLICY says which.

conftest.py records (syscall number, errno) of every error reply received while
a conformance test runs, and orders this test after all of them. It runs in the
whole suite too; when only part of the conformance suite was selected (-k, a
single file, -m slow), it skips rather than report what was never run.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from syscalls import BY_NAME, BY_NUMBER, TABLE, Errno
from syscalls.gen import GENERIC_ERRORS, generic_errors

from ._util import RECORDER

# (syscall, errno) pairs no test produces, each with the reason. Keep it short: an
# errno that can be produced gets a test instead.
EXEMPT: dict[tuple[str, str], str] = {
    ("write_tensor", "E2BIG"): "needs a request carrying a data frame over 1 GiB; the "
                               "same schema check (syscalls/_schema.py) is produced on "
                               "echo's 16 MiB bound",
}

# How each row of GENERIC_ERRORS, (errno, scope), must be produced: "each" syscall it
# applies to, or "once", on a syscall whose own errors do not list the errno and to
# which no "each" row of that errno applies (an unknown number counts as such).
POLICY: dict[tuple[str, str], str] = {
    ("EPROTO", "all"): "each", ("ENOSYS", "all"): "once", ("ENOTCONN", "attached"): "each",
    ("EINVAL", "all"): "each", ("E2BIG", "bytes"): "each", ("E2BIG", "all"): "once",
    ("EAGAIN", "driver"): "each", ("EIO", "driver"): "once",
}
SCOPES = {"all": lambda s: True, "attached": lambda s: s.name != "attach",
          "bytes": lambda s: any(a.type == "bytes" for a in s.args),
          "kernel": lambda s: s.service == "kernel", "driver": lambda s: s.service != "kernel"}


def required() -> set[tuple[str, str]]:
    """(syscall, errno) pairs that must each be produced."""
    pairs = {(s.name, e) for s in TABLE for e in s.errors}
    for (errno, scope), how in POLICY.items():
        if how == "each":
            pairs |= {(s.name, errno) for s in TABLE if SCOPES[scope](s)}
    return pairs


def once_missing(got: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """The "once" rows no produced pair satisfies."""
    missing = []
    for (errno, scope), how in POLICY.items():
        if how != "once":
            continue
        each = [sc for (e, sc), h in POLICY.items() if e == errno and h == "each"]
        if not any(e == errno and (name not in BY_NAME or (
                SCOPES[scope](BY_NAME[name]) and errno not in BY_NAME[name].errors
                and not any(SCOPES[sc](BY_NAME[name]) for sc in each)))
                for name, e in got):
            missing.append((errno, scope))
    return missing


def seen() -> set[tuple[str, str]]:
    out = set()
    for number, errno in RECORDER.seen:
        call = BY_NUMBER.get(number)
        try:
            out.add((call.name if call else f"#{number}", Errno(errno).name))
        except ValueError:
            out.add((call.name if call else f"#{number}", str(errno)))
    return out


def test_the_exemptions_name_real_contract_entries() -> None:
    for (name, errno), why in EXEMPT.items():
        assert name in BY_NAME and why, name
        call = BY_NAME[name]
        assert errno in call.errors or errno in {e for e, _ in generic_errors(call)}, \
            (name, errno)
    assert set(POLICY) == {(e, scope) for e, scope, _ in GENERIC_ERRORS}, \
        "give each row of GENERIC_ERRORS a POLICY"


def test_every_listed_errno_is_produced() -> None:
    here = Path(__file__).resolve().parent
    modules = {p.name for p in here.glob("test_*.py")} - {Path(__file__).name}
    missing_modules = modules - RECORDER.collected
    if missing_modules:
        pytest.skip(f"part of the conformance suite only (not run: "
                    f"{', '.join(sorted(missing_modules))})")
    got = seen()
    missing = sorted(required() - got - set(EXEMPT))
    once = once_missing(got)
    stale = sorted(set(EXEMPT) & got)
    assert not missing and not once, (
        f"{len(missing)} (syscall, errno) pairs of the contracts were never produced "
        f"by a conformance test: {missing}; generic errnos never produced: {once}. "
        "Add a test that produces each, or, if one cannot be produced, say so in its "
        "contract and add it to EXEMPT with the reason.")
    assert not stale, f"exempt, but produced after all (drop them from EXEMPT): {stale}"
    unlisted = sorted((name, e) for name, e in got
                      if name in BY_NAME and e not in BY_NAME[name].errors
                      and e not in {g for g, _ in generic_errors(BY_NAME[name])})
    assert not unlisted, f"errnos produced but in no contract: {unlisted}"
