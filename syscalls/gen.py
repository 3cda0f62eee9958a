"""Generate syscalls/client/_stubs.py and docs/syscalls.md from the syscall table, and
docs/settings.md from the settings (syscalls/_config.py).

    python -m syscalls.gen          write both files
    python -m syscalls.gen --check  exit 1 if either is out of date (tests run this)

Like xv6's usys.pl: the table is the source, the stubs and the reference follow.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ._units import number
from ._table import TABLE, Arg, Syscall

# The errors any call can get, whatever its own code does, as (errno, scope, when).
# scope says which calls: "all", "attached" (all but attach), "bytes" (calls with a
# bytes argument), "kernel" or "driver" (calls the kernel, or a driver, serves).
GENERIC_ERRORS: tuple[tuple[str, str, str], ...] = (
    ("EPROTO", "all", "the request's ABI version is not the kernel's (checked first)"),
    ("ENOSYS", "all", "no syscall has the request's number; or no driver of the "
                      "syscall's service is configured (`drivers` in config.toml)"),
    ("ENOTCONN", "attached", "the connection is not attached: it never was, or its "
                             "process ended (after exit, a kill, or lost heartbeats), or "
                             "the kernel restarted since it attached (the library says "
                             "ECONNRESET then)"),
    ("EINVAL", "all", "the arguments break the schema: one missing, unknown or of the "
                      "wrong type, a number out of its bounds, a string or list over "
                      "its length or with NUL, a value not among its choices"),
    ("E2BIG", "bytes", "a bytes argument over its length bound (echo: 16 MiB, "
                       "write_tensor: 1 GiB)"),
    ("E2BIG", "all", "the reply's header would be over 1 MiB (a ps of processes that "
                     "attached with huge argv, a listdir of thousands of long names): "
                     "the kernel or the driver answers E2BIG instead of a reply the "
                     "library would drop"),
    ("EAGAIN", "driver", "the caller has max_inflight_per_process calls in flight to "
                         "drivers already (a call it gave up on counts until its driver "
                         "answers it), or the driver's queue is full"),
    ("EIO", "driver", "the driver died while serving the call and it is not idempotent "
                      "(an idempotent one is retried once on the next instance first), "
                      "or stayed down longer than driver_wait_s, or failed on an "
                      "unexpected error (e.g. an OS error), or answered with a reply that "
                      "cannot be decoded, or llmos is shutting down"),
)

# What a call waits for before it answers, for the calls that do more than answer
# at once (the others: "answers at once", or "as soon as the driver has served it").
BLOCKING: dict[str, str] = {
    "wait": "parks until a child it waits for ends (at once when one is a zombie "
            "already) or timeout passes (ETIMEDOUT; 0 polls, None waits as long as it "
            "takes); the kernel serves everyone else meanwhile",
    "sleep": "answers after `seconds`; the echo driver serves other calls meanwhile",
    "ticks": "streams `count` partial replies `interval` seconds apart, then the final "
             "one",
    "alloc_gpu": "without `wait`, answers at once; with `wait=True`, queues until the "
                 "request is met, `timeout` passes (ETIMEDOUT) or the caller ends",
    "close_tensor": "a commit answers once the data and its directory are fsynced",
    "fsck": "answers once every tensor under path is read and its checksum verified "
            "(a background thread of the driver does it: other calls are served "
            "meanwhile)",
    "spawn_train": "answers once the job is checked and spawned (loading torch the "
                   "first time takes seconds); it does not wait for the job: wait does",
    "infer": "answers when max_tokens are generated (the context slides: a generation "
             "may outlive it); with `stream=True` partial replies bring the text as it is "
             "generated; the first call for a model loads it",
}


def generic_errors(s: Syscall) -> list[tuple[str, str]]:
    """The (errno, when) of GENERIC_ERRORS that apply to syscall s."""
    applies = {"all": True, "attached": s.name != "attach",
               "bytes": any(a.type == "bytes" for a in s.args),
               "kernel": s.service == "kernel", "driver": s.service != "kernel"}
    return [(name, when) for name, scope, when in GENERIC_ERRORS if applies[scope]]


def _names(pairs: list[tuple[str, str]]) -> list[str]:
    return list(dict.fromkeys(name for name, _ in pairs))


def _blocking(s: Syscall) -> str:
    if s.name in BLOCKING:
        return BLOCKING[s.name]
    if s.blocks or s.streams:
        raise ValueError(f"syscall {s.name} blocks or streams: say how in gen.BLOCKING")
    return ("answers at once" if s.service == "kernel"
            else "answers as soon as the driver has served it; waits for no other process")

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / "syscalls" / "client" / "_stubs.py"
REFERENCE = ROOT / "docs" / "syscalls.md"

_PY = {"int": "int", "float": "float", "str": "str", "bytes": "bytes", "bool": "bool",
       "list[str]": "list[str]", "dict[str,str]": "dict[str, str]",
       "size": "int | str", "list[int]": "list[int]", "slice": "list[list[int]]",
       "dict": "dict[str, Any]", "members": "list[list[Any]]",
       "messages": "list[dict[str, str]]"}


def _annotation(arg: Arg) -> str:
    t = _PY[arg.type]
    return f"{t} | None" if arg.nullable else t


def _param(arg: Arg) -> str:
    if arg.required:
        return f"{arg.name}: {_annotation(arg)}"
    return f"{arg.name}: {_annotation(arg)} = {arg.default!r}"


def _stub(s: Syscall) -> str:
    params = ", ".join(["self", *(_param(a) for a in s.args)])
    args = "{" + ", ".join(f"{a.name!r}: {a.name}" for a in s.args) + "}"
    if s.streams and "stream" in s.by_name:  # the caller chooses: the final reply, or all
        return (f"    def {s.name}({params}) -> Any:\n"
                f"        {s.doc!r}\n"
                f"        if stream:\n"
                f"            return self._stream({s.number}, {args})\n"
                f"        return self._call({s.number}, {args})\n")
    ret = "Iterator[Any]" if s.streams else "Any"
    body = "_stream" if s.streams else "_call"
    return (f"    def {s.name}({params}) -> {ret}:\n"
            f"        {s.doc!r}\n"
            f"        return self.{body}({s.number}, {args})\n")


def stubs() -> str:
    methods = "\n".join(_stub(s) for s in TABLE if s.name != "attach")
    return (
        '"""One method per syscall. GENERATED by `python -m syscalls.gen`: do not edit."""\n'
        "from __future__ import annotations\n\n"
        "from typing import Any, Iterator\n\n\n"
        "class SyscallMethods:\n"
        "    def _call(self, number: int, args: dict) -> Any:\n"
        "        raise NotImplementedError\n\n"
        "    def _stream(self, number: int, args: dict) -> Iterator[Any]:\n"
        "        raise NotImplementedError\n\n"
        f"{methods}"
    )


def _bounds(a: Arg) -> str:
    parts = []
    if a.lo is not None:
        parts.append(f">= {number(a.lo)}")
    if a.hi is not None:
        parts.append(f"<= {number(a.hi)}")
    if a.max_len is not None:
        parts.append(f"length <= {a.max_len}")
    if a.choices:
        parts.append("one of " + ", ".join(a.choices))
    return "; ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference() -> str:
    out = ["# Syscall reference",
           "",
           "GENERATED from `syscalls/_table.py` by `python -m syscalls.gen`: do not edit.",
           "A test fails when this page is out of date; `tests/conformance` fails when an "
           "errno listed here is never produced.",
           "",
           "| # | name | service | blocks | idempotent | streams |",
           "|---|------|---------|--------|------------|---------|"]
    yn = {True: "yes", False: ""}
    for s in TABLE:
        out.append(f"| {s.number} | [`{s.name}`](#{s.name}) | {s.service} | {yn[s.blocks]} "
                   f"| {yn[s.idempotent]} | {yn[s.streams]} |")
    scope = {"all": "every call", "attached": "every call but `attach`",
             "bytes": "calls with a bytes argument", "kernel": "calls the kernel serves",
             "driver": "calls a driver serves"}
    out += ["", "## Errors every call can get", "",
            "Besides its own errors, listed with it below, a syscall can fail with these. "
            "The kernel checks, in this order, the ABI version (`EPROTO`), the number "
            "(`ENOSYS`), that the connection is attached (`EPERM`) and the arguments "
            "(`EINVAL`, `E2BIG`) before it serves a call or routes it to its driver; the "
            "routing adds `ENOSYS`, `EAGAIN` and `EIO`.",
            "",
            "| errno | calls | when |",
            "|-------|-------|------|"]
    for name, sc, when in GENERIC_ERRORS:
        out.append(f"| `{name}` | {scope[sc]} | {_cell(when)} |")
    out += ["",
            "A call to a driver that is down (restarting) waits in the kernel for up to "
            "`driver_wait_s` (10 s) before it gets `EIO`; no call blocks the kernel or "
            "its driver.",
            "",
            "The userland library raises some errors itself, with no reply from the "
            "kernel: `ETIMEDOUT` when a reply does not come within "
            "`connect(timeout=...)` (it then cancels the call), `EIO` when the kernel is "
            "gone, `ECONNRESET` when another kernel serves the home since the handle "
            "attached (its process ended with the old one), `EBADF` on a closed handle, "
            "`E2BIG` for a request header over 1 MiB, `EINVAL` for arguments it cannot "
            "encode (an int past 64 bits), and, in `connect()`, `ENOENT` when llmos is "
            "not running and `EACCES` when `run/secret` cannot be read.",
            "",
            "A failed call raises `SyscallError`, of its errno's family: `NotFound` "
            "(ENOENT, ESRCH, ECHILD), `PermissionDenied` (EACCES, EPERM), `AlreadyExists` "
            "(EEXIST), `InvalidArgument` (EINVAL, E2BIG, ENAMETOOLONG, EMSGSIZE), "
            "`OutOfResources` (ENOMEM, ENOSPC, EDQUOT, EFBIG, EMFILE), `Busy` (EAGAIN, "
            "EBUSY), `TimedOut` (ETIMEDOUT), `Cancelled` (ECANCELED), `ConnectionLost` "
            "(ECONNRESET, ENOTCONN); each still has `.errno` and `.message`."]
    for s in TABLE:
        out += ["", f"## {s.name}", "", f"`{s.number}` · service `{s.service}`", "", s.doc, ""]
        if s.args:
            out += ["| argument | type | default | bounds | meaning |",
                    "|----------|------|---------|--------|---------|"]
            for a in s.args:
                default = "required" if a.required else f"`{a.default!r}`"
                out.append(f"| `{a.name}` | `{_cell(_annotation(a))}` | {default} | {_bounds(a)} "
                           f"| {a.doc} |")
            out.append("")
        out.append(f"Returns: {s.returns or 'None'}.")
        out += ["", f"Blocking: {_blocking(s)}."]
        if s.errors:
            out += ["", "| errno | when |", "|-------|------|"]
            for name in s.errors:
                when = s.error_when.get(name)
                if not when:
                    raise ValueError(f"syscall {s.name}: error {name} has no condition: "
                                     "give it as (errno, when) in syscalls/_table.py")
                out.append(f"| `{name}` | {_cell(when)} |")
        generic = ", ".join(f"`{name}`" for name in _names(generic_errors(s)))
        out += ["", ("Also" if s.errors else "Errors: only") + " the errors every call can "
                f"get: {generic} ([above](#errors-every-call-can-get))."]
    return "\n".join(out) + "\n"


def settings() -> str:
    """docs/settings.md: every setting of config.toml, from syscalls/_config.py."""
    from ._config import Config
    out = ["# Settings", "",
           "GENERATED by `python -m syscalls.gen` from `syscalls/_config.py`: do not "
           "edit.", "",
           "`$LLMOS_HOME/config.toml` may set any of these (TOML: `key = value`). Every "
           "value is checked when the kernel boots (a wrong type, a number out of range, "
           "a size that does not parse, an unknown key: the kernel refuses to boot and "
           "names the file and the key); sizes are bytes or strings such as `\"2GiB\"`, "
           "quotas tables of uid (as a string) = size, e.g. `tensor_quota = {\"1001\" = "
           "\"4GiB\"}`.", "",
           "| key | default | meaning |", "|---|---|---|"]
    for name, default, doc in Config.describe():
        shown = f'"{default}"' if isinstance(default, str) else default
        if isinstance(default, list):
            shown = "[" + ", ".join(f'"{d}"' for d in default) + "]"
        out.append(f"| `{name}` | `{shown}` | {_cell(doc)} |")
    return "\n".join(out) + "\n"


SETTINGS = ROOT / "docs" / "settings.md"


def main(argv: list[str]) -> int:
    wanted = {STUBS: stubs(), REFERENCE: reference(), SETTINGS: settings()}
    if "--check" in argv:
        stale = [str(p) for p, text in wanted.items()
                 if not p.exists() or p.read_text() != text]
        if stale:
            print("out of date (run python -m syscalls.gen):", *stale, sep="\n  ")
            return 1
        return 0
    for path, text in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
