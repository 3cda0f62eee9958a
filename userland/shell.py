"""The llmos shell: `llmos shell` (docs/shell.md).

One process for a whole session: it attaches to the kernel once, as an llmos
process with heartbeats (ps shows it), and every command is a syscall or a few
made on that one connection. Interactive on a terminal (prompt_toolkit: history in
$LLMOS_HOME/shell_history, TAB completion of commands and tensorfs paths, a
tensorfs working directory in the prompt); `-c "CMD; CMD"` runs commands; a script
on stdin (when stdin is not a terminal) runs one command per line.

Every failure is one line on stderr: `ERRNO: message` for a failed syscall, `usage:
...` for bad arguments, `ENOSYS: ...` for an unknown command, `EIO: internal error:
...` for anything unexpected; the shell goes on. With -c or a script the exit
status is 0 if every command succeeded, else 1 (or exit N's N).

The commands are in userland/_shell_commands.py, what they draw (rich tables) in
userland/_shell_views.py.
"""
from __future__ import annotations

import errno as errnos
import os
import posixpath
import shlex
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console, RenderableType

from syscalls import Home, SyscallError
from userland import _shell_commands as cmds
from userland._shell_commands import ExitShell, UsageError
from userland.cli import CliError, call_timeout, connect

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
    def __init__(self, home: Home, osh: Any, interactive: bool) -> None:
        self.home = home
        self.osh = osh
        self.interactive = interactive  # a person at a terminal, at the prompt
        self.tty = sys.stdout.isatty()
        # top's live view needs both ends to be the terminal
        self.live = interactive and self.tty and sys.stdin.isatty()
        width = None if self.tty or os.environ.get("COLUMNS") else 200
        self.out = Console(markup=False, highlight=False, emoji=False, soft_wrap=False,
                           width=width)
        self.err = Console(stderr=True, markup=False, highlight=False, emoji=False,
                           soft_wrap=True)
        self.cwd = "/"
        self.previous = "/"
        self.allocs: dict[str, dict] = {}
        self.failed = False  # a command has failed: -c and scripts exit 1
        self._status_len = 0
        self._chat_session: Any = None

    # -- output ------------------------------------------------------------------

    def line(self, text: str) -> None:
        sys.stdout.write(text + "\n")

    def show(self, renderable: RenderableType) -> None:
        """Print a rich renderable (a table), without the spaces rich pads lines with."""
        with self.out.capture() as captured:
            self.out.print(renderable)
        text = "\n".join(line.rstrip() for line in captured.get().split("\n"))
        sys.stdout.write(text)
        sys.stdout.flush()

    def error(self, text: str) -> None:
        """One line on stderr."""
        sys.stdout.flush()
        self.err.print(text, style="red", highlight=False)

    def note(self, text: str) -> None:
        """A remark on stderr (not an error)."""
        sys.stdout.flush()
        self.err.print(text, style="dim")

    def syscall_error(self, e: SyscallError) -> None:
        name = getattr(e.errno, "name", str(e.errno))
        self.error(f"{name}: {e.message}")

    def status(self, text: str) -> None:
        """A progress line: rewritten in place on a terminal, else a line each."""
        if self.tty:
            width = max(10, self.out.size.width - 1)
            text = text[:width]
            sys.stdout.write("\r" + text.ljust(self._status_len))
            self._status_len = len(text)
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def clear_status(self) -> None:
        if self._status_len:
            sys.stdout.write("\r" + " " * self._status_len + "\r")
            sys.stdout.flush()
            self._status_len = 0

    # -- state -------------------------------------------------------------------

    def resolve(self, path: str) -> str:
        """A tensorfs path, relative to the working directory unless absolute."""
        joined = posixpath.join(self.cwd, path) if path else self.cwd
        normal = posixpath.normpath(joined)
        return "/" + normal.lstrip("/")

    @contextmanager
    def unbounded(self) -> Iterator[None]:
        """Calls that block for as long as they need (wait, infer...): no per-reply
        timeout; Ctrl-C ends them."""
        saved = self.osh.timeout
        self.osh.timeout = None
        try:
            yield
        finally:
            self.osh.timeout = saved

    def read_line(self, prompt: str) -> str | None:
        """A line for a command that reads input (chat); None at the end."""
        if sys.stdin.isatty():
            if self._chat_session is None:
                from prompt_toolkit import PromptSession
                self._chat_session = PromptSession()
            try:
                return self._chat_session.prompt(prompt)
            except (EOFError, KeyboardInterrupt):
                return None
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None

    # -- running commands --------------------------------------------------------

    def execute(self, argv: list[str]) -> bool:
        """Run one command; True if it succeeded. Never raises but ExitShell,
        BrokenPipeError (the reader of our output left) and, in a script,
        KeyboardInterrupt."""
        name, args = argv[0], argv[1:]
        alias = cmds.ALIASES.get(name)
        if alias is not None:
            expansion = alias.split()
            name, args = expansion[0], expansion[1:] + args
        cmd = cmds.COMMANDS.get(name)
        if cmd is None:
            self.error(cmds.unknown(name))
            return False
        if args[:1] in (["-h"], ["--help"]) and not cmd.remainder or args == ["--help"]:
            self.line(cmd.help_text())
            return True
        try:
            result = cmd.func(self, cmd.parse(args))
            return result is not False
        except UsageError as e:
            self.error(f"usage: {cmd.usage} ({e})")
        except SyscallError as e:
            self.syscall_error(e)
        except (ExitShell, BrokenPipeError):
            raise
        except KeyboardInterrupt:
            self.clear_status()
            if not self.interactive:  # Ctrl-C ends a script (status 130)
                raise
            sys.stdout.write("\n")
            self.error("interrupted")
        except OSError as e:
            name = errnos.errorcode.get(e.errno or 0, "EIO")
            where = f": {e.filename}" if e.filename is not None else ""
            self.error(f"{name}: {e.strerror or e}{where}")
        except Exception as e:
            self.error(f"EIO: internal error: {type(e).__name__}: {e}")
        finally:
            sys.stdout.flush()
        return False

    def run_line(self, line: str) -> bool:
        """The commands of a line; True if all succeeded. A failure is also
        remembered in self.failed, for the exit status of -c and scripts."""
        try:
            commands = parse_line(line)
        except ValueError as e:  # No closing quotation
            self.error(f"EINVAL: cannot parse the line: {str(e).lower()}")
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
        return [("bold ansigreen", "llmos"), ("", ":"), ("bold ansiblue", self.cwd),
                ("", "$ ")]

    def repl(self) -> int:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.shortcuts import CompleteStyle

        from userland._shell_complete import ShellCompleter

        path = self.home.root / HISTORY_FILE
        history: Any = FileHistory(str(path)) if os.access(self.home.root, os.W_OK) \
            else InMemoryHistory()
        session: PromptSession = PromptSession(
            history=history, completer=ShellCompleter(self), complete_while_typing=False,
            complete_style=CompleteStyle.READLINE_LIKE)
        self.note(f"llmos shell, pid {self.osh.pid} (uid {self.osh.uid}) on {self.home.root}"
                  f"; help lists the commands, exit or Ctrl-D leaves")
        while True:
            try:
                line = session.prompt(self.prompt())
            except KeyboardInterrupt:
                continue
            except EOFError:
                return 0
            try:
                self.run_line(line)
            except ExitShell as e:
                return e.status or 0


def main(home: Home, commands: str | None) -> int:
    """`llmos shell [-c COMMANDS]`: its exit status."""
    try:
        osh = connect(home, heartbeat=True)
    except CliError as e:
        print(e, file=sys.stderr)
        return e.code
    except SyscallError as e:
        print(f"llmos: {e.errno.name}: {e.message}", file=sys.stderr)
        return 1
    status = 1
    try:
        interactive = commands is None and sys.stdin.isatty()
        sh = Shell(home, osh, interactive)
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
        osh.timeout = call_timeout()  # for the exit() that detaching makes
        osh.close(0)
    return status
