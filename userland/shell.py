"""The llmos shell: `llmos shell` (docs/shell.md).

A REPL over the command table (_command.py): every command a line can name is a
command `llmos VERB` runs too, with the same arguments, defaults, help and
output. One process for a whole session: it attaches once, as an llmos process
with heartbeats (ps shows it), keeps a tensorfs working directory and the GPU
allocations it made. Interactive on a terminal (prompt_toolkit: history in
$LLMOS_HOME/shell_history, TAB completion from the table); `-c "CMD; CMD"` runs
commands; a script on stdin runs a line at a time.

When the kernel restarts under it, the shell's process is gone with the old
kernel (a reboot ends processes): before the next command it attaches again and
says so in one line.

Every failure is one line on stderr (`ERRNO: message`, `usage: ...`); the shell
goes on. With -c or a script the exit status is 0 if every command succeeded,
else 1 (or exit N's N).
"""
from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from syscalls import Home, SyscallError

from ._base import CliError, ExitShell
from ._command import ALIASES, Session, lookup, run, unknown

HISTORY_FILE = "shell_history"  # under LLMOS_HOME


# -- parsing a line ----------------------------------------------------------------

def split_commands(line: str) -> list[str]:
    """line cut at each ; outside quotes, up to a # that starts a word (a comment)."""
    parts: list[str] = []
    cur: list[str] = []
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote is not None:
            cur.append(c)
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"' and i + 1 < len(line):
                cur.append(line[i + 1])
                i += 1
        elif c == "\\":
            cur.append(c)
            if i + 1 < len(line):
                cur.append(line[i + 1])
                i += 1
        elif c in "'\"":
            quote = c
            cur.append(c)
        elif c == ";":
            parts.append("".join(cur))
            cur = []
        elif c == "#" and (not cur or cur[-1].isspace()):
            break
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return [p for p in parts if p.strip()]


def parse_line(line: str) -> list[list[str]]:
    """The commands of a line, each split into words as sh would (shlex).
    ValueError for an unclosed quote."""
    return [words for part in split_commands(line) if (words := shlex.split(part))]


# -- the shell ---------------------------------------------------------------------

class Shell:
    def __init__(self, session: Session, interactive: bool) -> None:
        self.session = session
        self.interactive = session.interactive = interactive  # a person at the prompt
        self.failed = False  # a command has failed: -c and scripts exit 1

    def execute(self, argv: list[str]) -> bool:
        """Run one command; True if it succeeded. Raises only ExitShell,
        BrokenPipeError and, in a script, KeyboardInterrupt."""
        name, args = argv[0], argv[1:]
        if name in ALIASES:
            expansion = ALIASES[name].split()
            name, args = expansion[0], expansion[1:] + args
        cmd = lookup(name, shell=True)
        if cmd is None:
            self.session.error(f"ENOSYS: {unknown(name, shell=True)}")
            return False
        self.reattach_if_restarted()
        try:
            status = run(self.session, cmd, args)
        except KeyboardInterrupt:  # between the command's own handlers
            if not self.interactive:  # Ctrl-C ends a script (status 130)
                raise
            self.session.error("interrupted")
            return False
        return status == 0

    def reattach_if_restarted(self) -> None:
        """A kernel that restarted since the shell attached knows neither it nor its
        process: attach again, and say so once."""
        s = self.session
        osh = s._osh
        if osh is None:
            return
        now = s.home.kernel_pid()
        if now is None or now == osh.kernel_pid:
            return
        old_pid, old_kernel = osh.pid, osh.kernel_pid
        s._osh = None
        osh.close()
        s.allocs.clear()  # they ended with the old kernel's processes
        try:
            new = s.osh
        except (SyscallError, CliError) as e:
            s.error(f"the llmos kernel restarted and the shell cannot attach again: {e}")
            return
        s.note(f"llmos: the kernel restarted (pid {old_kernel} -> {now}); the shell is "
               f"now pid {new.pid} (was {old_pid})")

    def run_line(self, line: str) -> bool:
        """The commands of a line; True if all succeeded. A failure is also
        remembered in self.failed, for the exit status of -c and scripts."""
        try:
            commands = parse_line(line)
        except ValueError as e:  # No closing quotation
            self.session.error(f"EINVAL: cannot parse the line: {str(e).lower()}")
            self.failed = True
            return False
        ok = True
        for argv in commands:
            if not self.execute(argv):
                ok = False
                self.failed = True
        return ok

    def exit_status(self, e: ExitShell | None = None) -> int:
        if e is not None and e.status is not None:
            return e.status
        return 1 if self.failed else 0

    def run_commands(self, text: str) -> int:
        """-c: the commands of text; 0 if all succeeded, else 1, or exit's status."""
        try:
            for line in text.splitlines():
                self.run_line(line)
        except ExitShell as e:
            return self.exit_status(e)
        return self.exit_status()

    def run_stdin(self) -> int:
        """A script on stdin, a line at a time (a command such as chat may read the
        lines after it)."""
        try:
            while line := sys.stdin.readline():
                self.run_line(line.rstrip("\n"))
        except ExitShell as e:
            return self.exit_status(e)
        return self.exit_status()

    def prompt(self) -> Any:
        return [("bold ansigreen", "llmos"), ("", ":"), ("bold ansiblue", self.session.cwd),
                ("", "$ ")]

    def repl(self) -> int:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.shortcuts import CompleteStyle

        from ._complete import ShellCompleter

        s = self.session
        path = s.home.root / HISTORY_FILE
        history: Any = FileHistory(str(path)) if os.access(s.home.root, os.W_OK) \
            else InMemoryHistory()
        prompt: PromptSession = PromptSession(
            history=history, completer=ShellCompleter(s), complete_while_typing=False,
            complete_style=CompleteStyle.READLINE_LIKE)
        s.note(f"llmos shell, pid {s.osh.pid} (uid {s.osh.uid}) on {s.home.root}; help "
               "lists the commands, exit or Ctrl-D leaves")
        while True:
            try:
                line = prompt.prompt(self.prompt())
            except KeyboardInterrupt:
                continue
            except EOFError:
                return 0
            try:
                self.run_line(line)
            except ExitShell as e:
                return e.status or 0


def main(home: Home, commands: str | None, uid: int | None = None) -> int:
    """`llmos shell [-c COMMANDS]`: its exit status."""
    session = Session(home, uid, shell=True, argv=["llmos", "shell"])
    try:
        session.osh  # attach now: no kernel is one line, before any prompt
    except CliError as e:
        print(e, file=sys.stderr)
        return e.code
    except SyscallError as e:
        print(f"llmos: {e.errno.name}: {e.message}", file=sys.stderr)
        return 1
    status = 1
    try:
        interactive = commands is None and sys.stdin.isatty()
        sh = Shell(session, interactive)
        if commands is not None:
            status = sh.run_commands(commands)
        elif interactive:
            status = sh.repl()
        else:
            status = sh.run_stdin()
    except BrokenPipeError:  # the reader left (llmos shell -c ps | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:
        status = 130
    finally:
        try:
            session.detach()
        except Exception:  # the kernel went away meanwhile: nothing left to end
            pass
    return status
