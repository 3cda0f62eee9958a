"""The llmos command: `llmos [--home PATH] [--uid N] COMMAND [ARGS...]`.

Every command is an entry of the command table (_command.py, one module per
family); this is the CLI's way into it, as shell.py is the shell's. It is a
userland program like any other: it speaks to the kernel only through syscalls,
and starts the kernel as a separate OS process (python -m kernel); it never
imports kernel or drivers. A failure is one line on stderr, never a traceback.
See docs/cli.md; docs/commands.md lists every command.

It imports only what the command needs (numpy, torch, rich and prompt_toolkit
load with the few commands that use them): `llmos ps` must start in well under
twice the time of `python -c "import zmq, msgpack"` (bench/startup.py).

Exit status: 0 done, 1 failed, 2 bad usage, 3 from `status` when no kernel runs
(as systemctl's), 130 after Ctrl-C, and `run` passes on its program's status.
"""
from __future__ import annotations

import os
import sys
from argparse import ArgumentTypeError
from typing import Sequence

from syscalls import ABI_VERSION, Home

from ._base import CliError
from ._argtypes import home_arg, uid_arg
from ._command import FAMILIES, Session, commands, lookup, run, unknown

USAGE = "usage: llmos [--home PATH] [--uid N] [--version] COMMAND [ARGS...]"


def version() -> str:
    from importlib import metadata
    try:
        number = metadata.version("llmos")
    except metadata.PackageNotFoundError:
        number = "unknown"
    return f"llmos {number} (ABI {ABI_VERSION})"


def overview() -> str:
    """The top-level help: the usage, the global options and every command."""
    lines = [USAGE, "", "Run and inspect an llmos instance.", "",
             "options (also accepted after the command):",
             "  --home PATH  LLMOS_HOME to use (default: $LLMOS_HOME, else ~/.llmos)",
             "  --uid N      act as uid N (with the home's secret: an administrator's "
             "credential)",
             "  --version    the version and the ABI", ""]
    table = commands()
    for family in FAMILIES:
        here = [c for c in table.values() if c.family == family and c.scope != "shell"]
        if here:
            lines.append(family)
            lines += [f"  {c.name:<11} {c.summary}" for c in here]
    lines += ["", "llmos COMMAND --help shows a command's arguments and their defaults."]
    return "\n".join(lines)


def usage_error(text: str) -> int:
    print(f"{USAGE}\nllmos: error: {text}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    home_text, uid, i = None, None, 0
    while i < len(args) and args[i].startswith("-"):
        flag, eq, value = args[i].partition("=")
        if flag in ("-h", "--help"):
            print(overview())
            return 0
        if flag == "--version":
            print(version())
            return 0
        if flag not in ("--home", "--uid"):
            return usage_error(f"unrecognized option {args[i]!r}")
        if not eq:
            i += 1
            if i == len(args):
                return usage_error(f"{flag} wants a value")
            value = args[i]
        try:
            if flag == "--home":
                home_text = home_arg(value)
            else:
                uid = uid_arg(value)
        except ArgumentTypeError as e:
            return usage_error(f"argument {flag}: {e}")
        i += 1
    if i == len(args):
        return usage_error("name a command (llmos --help lists them)")
    name, rest = args[i], args[i + 1:]
    if name == "__complete":  # the generated completion scripts ask through this
        from ._complete import answer
        return answer(rest)
    cmd = lookup(name)
    if cmd is None:
        return usage_error(unknown(name, shell=False))
    try:
        home = Home.resolve(home_text)
    except RuntimeError as e:  # ~nosuchuser/...
        print(f"llmos: ENOENT: {e}", file=sys.stderr)
        return 1
    session = Session(home, uid, shell=False, argv=["llmos", *args])
    try:
        return run(session, cmd, rest)
    except KeyboardInterrupt:
        return 130
    except CliError as e:
        print(e, file=sys.stderr)
        return e.code
    except BrokenPipeError:
        # the reader left (llmos ps | head); keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        try:
            session.detach()
        except Exception:  # the kernel went away meanwhile: nothing left to end
            pass


if __name__ == "__main__":
    sys.exit(main())
