"""The command table: every userland command declared once, for `llmos VERB` and
for the shell alike.

A command is a function decorated with @command: its name, family, one-line
summary, arguments (argparse's, plus what TAB completes), the syscalls it makes
and how its result prints (a view: result -> lines). The function takes the
Session (where it runs: the CLI's one-shot process, or the shell's session) and
its parsed arguments, does its work through session.osh, and returns its result:
the framework prints it with the view, or as JSON with --json (every command
with a view has it). `llmos VERB --help`, the shell's help, TAB completion, the
generated completion scripts and docs/commands.md all read the same table, as
git's commands[] array feeds its help, completion and dispatch.

Families live in their own modules (FAMILIES), loaded when the table is first
read; nothing here imports them, so no module of userland imports another in a
cycle. It must never import the kernel or a driver.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import posixpath
import sys
from typing import Any, Callable, Iterator

from syscalls import Home, SyscallError

from ._argtypes import home_arg, uid_arg
from ._base import CliError, ExitShell, UsageError, call_timeout, os_error
from ._kernelctl import require_running

# family -> the module that declares its commands, in the order help lists them
FAMILIES = {
    "kernel": "userland._cmd_kernel",
    "processes": "userland._cmd_procs",
    "tensors": "userland._cmd_tensors",
    "devices": "userland._cmd_devices",
    "models": "userland._cmd_models",
    "compression": "userland._cmd_compress",
    "nodes": "userland._cmd_nodes",
    "cluster": "userland._cmd_cluster",
    "serving": "userland._cmd_serve",
    "session": "userland._cmd_session",
}
# where a command exists: both the CLI and the shell, or one of them (with why)
SCOPES = ("both", "cli", "shell")


# -- declaring commands ---------------------------------------------------------------

View = Callable[[Any, "Session", argparse.Namespace], "list[str]"]

class Arg:
    """One argument: argparse's flags and keywords, plus what TAB completes for its
    value (tensor, local, pid, alloc, signal, command, syscall, log, or "")."""

    __slots__ = ("flags", "kw", "complete")

    def __init__(self, flags: tuple[str, ...], kw: dict[str, Any], complete: str = "") -> None:
        self.flags, self.kw, self.complete = flags, kw, complete

    @property
    def positional(self) -> bool:
        return not self.flags[0].startswith("-")

    @property
    def takes_value(self) -> bool:
        return self.kw.get("action") not in ("store_true", "store_false", "count")


def arg(*flags: str, complete: str = "", **kw: Any) -> Arg:
    return Arg(flags, kw, complete)


class Command:
    """One entry of the table. (Plain classes here, not dataclasses: every llmos
    command loads the table, and the dataclasses module costs more to import.)"""

    def __init__(self, name: str, family: str, summary: str,
                 func: Callable[["Session", argparse.Namespace], Any], args: list[Arg],
                 syscalls: tuple[str, ...] = (), view: "View | None" = None,
                 json_keys: str = "", scope: str = "both", details: str = "",
                 remainder: bool = False) -> None:
        self.name, self.family, self.summary, self.func = name, family, summary, func
        self.args = args
        self.syscalls = syscalls      # the syscalls it makes (docs/commands.md)
        self.view = view              # how its result prints: view(result, session, args)
        self.json_keys = json_keys    # what --json prints (docs/commands.md)
        self.scope = scope            # both, or only the cli or the shell
        self.details = details
        self.remainder = remainder    # a last positional that takes the rest as it is
        self._parsers: dict[tuple[bool, bool], argparse.ArgumentParser] = {}

    @property
    def has_json(self) -> bool:
        return self.view is not None or bool(self.json_keys)

    def parser(self, cli: bool = False, head: bool = False) -> argparse.ArgumentParser:
        """The argparse parser (built once per kind): the declared arguments, --json
        for a command that prints data, and in the CLI --home and --uid. head: without
        a remainder argument (what comes before the program is parsed alone)."""
        p = self._parsers.get((cli, head))
        if p is not None:
            return p
        p = Parser(prog=f"llmos {self.name}" if cli else self.name, add_help=False,
                   description=self.summary, epilog=self.details or None,
                   formatter_class=_Formatter, allow_abbrev=False)
        for a in self.args[:-1] if head else self.args:
            p.add_argument(*a.flags, **a.kw)
        if self.has_json:
            p.add_argument("--json", action="store_true",
                           help="print the result as JSON (docs/commands.md lists its keys)")
        if cli:
            p.add_argument("--home", metavar="PATH", default=argparse.SUPPRESS,
                           type=home_arg, help="LLMOS_HOME (as before the command)")
            p.add_argument("--uid", type=uid_arg, default=argparse.SUPPRESS,
                           help="act as this uid (as before the command)")
        p.add_argument("-h", "--help", action="store_true", help="show this help")
        self._parsers[(cli, head)] = p
        return p

    def parse(self, argv: list[str], cli: bool = False) -> argparse.Namespace:
        if not self.remainder:
            return self.parser(cli).parse_intermixed_args(argv)
        head, rest = self._split(argv, cli)
        a = self.parser(cli, head=True).parse_intermixed_args(head)
        setattr(a, self.args[-1].kw.get("dest", self.args[-1].flags[0]), rest)
        return a

    def _split(self, argv: list[str], cli: bool) -> tuple[list[str], list[str]]:
        """argv cut where the remainder (a program and its arguments) starts: at "--",
        or at the first word past the fixed positionals that is not an option or an
        option's value (argparse's REMAINDER would swallow options given after a
        fixed positional: alloc 1GiB --count 2 python x.py)."""
        fixed = sum(1 for a in self.args[:-1] if a.positional)
        valued = {"--home", "--uid"} if cli else set()
        seen, i = 0, 0
        while i < len(argv):
            word = argv[i]
            if word == "--":
                return argv[:i], argv[i + 1:]
            if word.startswith("-") and len(word) > 1:
                flag = word.split("=", 1)[0]
                opt = self.option(flag)
                if "=" not in word and (flag in valued or (opt is not None
                                                            and opt.takes_value)):
                    i += 1
                i += 1
                continue
            if seen == fixed:
                return argv[:i], argv[i:]
            seen += 1
            i += 1
        return argv, []

    def usage(self, cli: bool = False) -> str:
        return self.parser(cli).format_usage().strip()

    def help_text(self, cli: bool = False) -> str:
        return self.parser(cli).format_help().rstrip()

    def option(self, flag: str) -> Arg | None:
        return next((a for a in self.args if flag in a.flags), None)

    def options(self) -> list[str]:
        return sorted(f for a in self.args if not a.positional for f in a.flags) + \
            (["--json"] if self.has_json else []) + ["--help"]


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> Any:  # type: ignore[override]
        raise UsageError((message or "").strip() or "bad arguments")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each argument's help ends with its default, when it has one worth saying.
    The width is found here, as shutil would (argparse imports shutil for it, and
    shutil imports the compression modules: 3 ms on every command)."""

    def __init__(self, prog: str) -> None:
        text = os.environ.get("COLUMNS", "")
        try:
            columns = int(text) if text else os.get_terminal_size().columns
        except (ValueError, OSError):
            columns = 80
        super().__init__(prog, width=max(40, columns - 2))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if d not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text += f" (default: {d})"
        return text


COMMANDS: dict[str, Command] = {}
ALIASES = {"quit": "exit", "?": "help", "ll": "ls -l"}


def command(name: str, family: str, summary: str, *args: Arg, syscalls: tuple[str, ...] = (),
            view: "View | None" = None, json_keys: str = "",
            scope: str = "both", details: str = "", remainder: bool = False
            ) -> Callable[[Callable], Callable]:
    """Declare a command: the decorated function is its body."""
    assert family in FAMILIES and scope in SCOPES, (name, family, scope)

    def register(func: Callable) -> Callable:
        COMMANDS[name] = Command(name, family, summary, func, list(args), syscalls, view,
                                 json_keys, scope, details, remainder)
        return func
    return register


def shows(name: str, family: str, summary: str, view: Callable[[Any, "Session"], list[str]],
          json_keys: str, details: str = "") -> None:
    """Declare a command that makes the syscall of its name, with no arguments, and
    shows the result (sysinfo, devices, models)."""
    def body(s: Session, a: argparse.Namespace) -> Any:
        return getattr(s.osh, name)()
    command(name, family, summary, syscalls=(name,), json_keys=json_keys, details=details,
            view=lambda result, s, a: view(result, s))(body)


def commands() -> dict[str, Command]:
    """Every command, its family's module loaded."""
    for module in FAMILIES.values():
        importlib.import_module(module)
    return COMMANDS


def lookup(name: str, shell: bool = False) -> Command | None:
    """The command named name (in the shell, aliases too) where it exists."""
    if shell and name in ALIASES:
        name = ALIASES[name].split()[0]
    cmd = commands().get(name)
    if cmd is None or cmd.scope == ("cli" if shell else "shell"):
        return None
    return cmd


def names(shell: bool) -> list[str]:
    here = [n for n, c in commands().items() if c.scope in ("both", "shell" if shell else "cli")]
    return sorted(here + (list(ALIASES) if shell else []))


def unknown(name: str, shell: bool) -> str:
    other = commands().get(name) or commands().get(ALIASES.get(name, "").split(" ")[0])
    if other is not None:  # a command of the other side
        return (f"{name}: a command of the llmos command, not of the shell (from a shell "
                f"prompt: llmos {name})" if shell else
                f"{name}: a command of the shell only (llmos shell, then {name})")
    import difflib
    close = difflib.get_close_matches(name, names(shell), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else \
        ("; help lists the commands" if shell else "; llmos --help lists the commands")
    return f"{name}: unknown command{hint}"


# -- where a command runs --------------------------------------------------------------

class Session:
    """Where commands run: the CLI's one-shot process (a connection per command),
    or the shell's session (one connection for its life, a tensorfs working
    directory, the allocations it holds). Either way each reply is awaited at most
    call_timeout(), so a stopped kernel is ETIMEDOUT, not a hang, except in
    unbounded(): the calls that wait by nature. Commands reach the kernel through
    .osh and print through .line."""

    def __init__(self, home: Home, uid: int | None = None, shell: bool = False,
                 argv: list[str] | None = None) -> None:
        self.home = home
        self.uid = uid
        self.shell = shell
        self.interactive = False      # a person at the shell's prompt
        self.argv = argv or ["llmos"]
        self.cwd = "/"
        self.previous = "/"
        self.allocs: dict[str, dict] = {}
        self.words: list[str] = []    # the command as typed: its name and arguments
        self.status = 0               # the exit status a command sets besides failing
        self.json = False             # this command prints JSON
        self.tty = sys.stdout.isatty()
        self._osh: Any = None

    # -- the connection ----------------------------------------------------------

    @property
    def osh(self) -> Any:
        """The handle, attached at first use."""
        if self._osh is None:
            self._osh = self.connect(heartbeat=self.shell)
        return self._osh

    def connect(self, heartbeat: bool = False, uid: int | None = None) -> Any:
        """A new handle on the running kernel, as this session's uid (or uid)."""
        from syscalls.client import connect
        if not os.environ.get("LLMOS_CREDENTIAL"):  # else: a kernel elsewhere, over TCP
            require_running(self.home)
        return connect(self.home.root, uid=self.uid if uid is None else uid,
                       heartbeat=heartbeat, timeout=call_timeout(),
                       argv=self.argv)

    @contextlib.contextmanager
    def unbounded(self) -> Iterator[Any]:
        """A call that waits as long as it takes (wait, infer, a training job's
        progress): no per-reply timeout; Ctrl-C ends it."""
        osh = self.osh
        saved, osh.timeout = osh.timeout, None
        try:
            yield osh
        finally:
            osh.timeout = saved

    def detach(self) -> None:
        """End the connection (a CLI command's process ends with it)."""
        if self._osh is not None:
            osh, self._osh = self._osh, None
            osh.timeout = call_timeout()  # for the exit() that detaching makes
            osh.close(0)

    # -- paths and output -----------------------------------------------------------

    def resolve(self, path: str) -> str:
        """A tensorfs path, relative to the working directory unless absolute (a
        member suffix, "[name]", is kept as it is)."""
        if path.endswith("]") and "[" in path:
            base, _, member = path.partition("[")
            return self.resolve(base) + "[" + member
        joined = posixpath.join(self.cwd, path) if path else self.cwd
        return "/" + posixpath.normpath(joined).lstrip("/")

    def line(self, text: str = "") -> None:
        sys.stdout.write(text + "\n")

    def lines(self, lines: list[str]) -> None:
        if lines:
            sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    def note(self, text: str) -> None:
        """A remark on stderr (not an error)."""
        sys.stdout.flush()
        print(text, file=sys.stderr, flush=True)

    def error(self, text: str) -> None:
        """One line on stderr: `llmos: TEXT` from the CLI, `TEXT` in the shell."""
        sys.stdout.flush()
        print(text if self.shell else f"llmos: {text}", file=sys.stderr, flush=True)


# -- running one ------------------------------------------------------------------------

def run(session: Session, cmd: Command, argv: list[str]) -> int:
    """Parse argv for cmd, run it in session and print its result; the exit status
    (0 done, 1 failed, 2 bad usage, 130 interrupted, or what the command set).
    Every failure is one line on stderr; only ExitShell, BrokenPipeError and, in
    the CLI, KeyboardInterrupt propagate."""
    cli = not session.shell
    if wants_help(cmd, argv, cli):
        session.line(cmd.help_text(cli))
        return 0
    try:
        a = cmd.parse(argv, cli)
    except UsageError as e:
        return bad_usage(session, cmd, e)
    if cli and hasattr(a, "home"):  # given after the command
        session.home = Home.resolve(a.home)
    if cli and hasattr(a, "uid"):
        session.uid = a.uid
    session.status, session.json = 0, bool(getattr(a, "json", False))
    session.words = [cmd.name, *argv]
    try:
        result = cmd.func(session, a)
        if result is None:  # it printed what it had to say (or had nothing)
            pass
        elif session.json:
            session.line(json.dumps(plain(result), indent=2, sort_keys=True))
        elif cmd.view is not None:
            session.lines(cmd.view(result, session, a))
        return session.status
    except UsageError as e:
        return bad_usage(session, cmd, e)
    except SyscallError as e:
        session.error(f"{e.errno.name}: {e.message}")
    except CliError as e:  # its own words, as they are
        sys.stdout.flush()
        print(e, file=sys.stderr, flush=True)
        return e.code
    except (ExitShell, BrokenPipeError):
        raise
    except KeyboardInterrupt:
        if not session.interactive:  # the CLI, or a shell script: Ctrl-C ends it
            raise
        sys.stdout.write("\n")
        session.error("interrupted")
        return 130
    except OSError as e:
        session.error(os_error(e))
    except Exception as e:  # a bug: one line, never a traceback (the shell goes on)
        session.error(f"EIO: internal error: {type(e).__name__}: {e}")
    finally:
        sys.stdout.flush()
    return 1


def wants_help(cmd: Command, argv: list[str], cli: bool) -> bool:
    """-h or --help among the command's own words (not a program's, after it)."""
    words = cmd._split(argv, cli)[0] if cmd.remainder else argv
    if "--" in words:
        words = words[:words.index("--")]
    return "-h" in words or "--help" in words


def bad_usage(session: Session, cmd: Command, e: Exception) -> int:
    """The command's usage and what was wrong: as argparse words it in the CLI, one
    line in the shell. Status 2."""
    sys.stdout.flush()
    usage = cmd.usage(not session.shell)
    if session.shell:
        print(" ".join(usage.split()) + f" ({e})", file=sys.stderr, flush=True)
    else:
        print(f"{usage}\nllmos {cmd.name}: error: {e}", file=sys.stderr, flush=True)
    return 2


def plain(value: Any) -> Any:
    """value as JSON can hold it: bytes as text (or their repr), tuples as lists."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            return data.decode()
        except UnicodeDecodeError:
            return repr(data)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def each(session: Session, items: list[Any], fn: Callable[[Any], None]) -> None:
    """fn on every item; a SyscallError is printed, the rest still run, and the
    command fails (status 1) if any did."""
    for item in items:
        try:
            fn(item)
        except SyscallError as e:
            session.error(f"{e.errno.name}: {e.message}")
            session.status = 1


__all__ = ["Arg", "CliError", "Command", "ExitShell", "Session", "UsageError", "arg",
           "call_timeout", "command", "commands", "each", "lookup", "names", "run",
           "unknown"]
