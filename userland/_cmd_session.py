"""The session's own commands: help, syscall, and the shell's exit."""
from __future__ import annotations

import argparse
import json
from typing import Any

from syscalls import BY_NAME, Errno, SyscallError

from ._argtypes import key_values
from ._command import (ALIASES, FAMILIES, ExitShell, Session, UsageError, arg, command,
                       commands, lookup, names, plain, unknown)


@command("help", "session", "list the commands, or show how to use one",
         arg("name", nargs="?", metavar="COMMAND", complete="command"))
def help_(s: Session, a: argparse.Namespace) -> None:
    if a.name:
        cmd = lookup(a.name, s.shell)
        if cmd is None:
            raise SyscallError(Errno.ENOSYS, unknown(a.name, s.shell))
        s.line(cmd.help_text(not s.shell))
        return
    here = set(names(s.shell))
    for family in FAMILIES:
        cmds = [c for c in commands().values() if c.family == family and c.name in here]
        if cmds:
            s.line(family)
            for c in cmds:
                s.line(f"  {c.name:<10} {c.summary}")
    if s.shell:
        s.line("aliases: " + ", ".join(f"{k} = {v}" for k, v in ALIASES.items()))
    s.line("\nhelp COMMAND (or COMMAND --help) shows its arguments and their defaults."
           + (" Commands are separated by ; or newlines; # starts a comment. TAB "
              "completes commands and paths." if s.shell else ""))


@command("exit", "session", "leave the shell (quit and Ctrl-D too)",
         arg("status", nargs="?", type=int, metavar="STATUS"), scope="shell",
         details="With -c or a script, the exit status is STATUS if given, else 0 if "
                 "every command succeeded and 1 if one failed.")
def exit_(s: Session, a: argparse.Namespace) -> None:
    if a.status is not None and not 0 <= a.status <= 255:
        raise UsageError("STATUS is 0 to 255")
    raise ExitShell(a.status)


def value(text: str) -> Any:
    """A syscall argument as typed: JSON, b:TEXT for bytes, else the text."""
    if text.startswith("b:"):  # bytes: the UTF-8 of the rest
        return text[2:].encode()
    try:
        return json.loads(text)
    except ValueError:
        return text


@command("syscall", "session", "make any syscall by name and print its result as JSON",
         arg("name", metavar="NAME", complete="syscall"),
         arg("args", nargs="*", metavar="KEY=VALUE"),
         details="VALUEs are JSON (12, 1.5, true, null, [1, 2], {\"a\": 1}), b:TEXT for "
                 "the bytes of TEXT, else text: syscall nop, syscall echo data=b:hi, "
                 "syscall sleep seconds=0.5, syscall report 'info={\"step\": 1}'. A "
                 "streaming syscall prints its final reply. docs/syscalls.md lists them.")
def syscall(s: Session, a: argparse.Namespace) -> None:
    if a.name not in BY_NAME or a.name == "attach":
        raise SyscallError(Errno.ENOSYS, f"no syscall named {a.name!r}"
                           + (" (the session is attached already)" if a.name == "attach"
                              else ""))
    if a.name == "exit" and s.shell:
        raise UsageError("use the exit command to leave the shell")
    kwargs = {k: value(v) for k, v in key_values(a.args, "arguments").items()}
    with s.unbounded() as osh:
        result = osh.call(a.name, **kwargs)
    s.line(json.dumps(plain(result), indent=2, sort_keys=True))
