"""TAB completion from the command table: the shell's (prompt_toolkit), and the
bash and zsh scripts `llmos completion` prints, which ask `llmos __complete CWORD
WORDS...` for candidates, so both complete alike.

What a word can be comes from the command's declaration (Arg.complete): a
tensorfs path (listdir through the session's connection), a local path, a pid
(ps), one of the session's allocations, a signal, a command or syscall name, a
log (a pid, kernel, a driver), an option's choices, or an option name after -.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Iterator

from syscalls import BY_NAME, Home, SyscallError
from syscalls.client import SIGNAL_NAMES

from ._base import CliError
from ._command import Command, Session, lookup, names

GLOBAL_OPTIONS = ("--home", "--uid", "--version", "--help")


def kind_of(cmd: Command, before: list[str]) -> tuple[str, list[str]]:
    """What the next word of cmd is, after the words before it: (kind, choices)."""
    if before and before[-1].startswith("-"):
        opt = cmd.option(before[-1])
        if opt is not None and opt.takes_value:
            return opt.complete, list(opt.kw.get("choices") or [])
    positionals = [a for a in cmd.args if a.positional]
    position, skip = 0, False
    for word in before:
        if skip:
            skip = False
        elif word.startswith("-") and len(word) > 1:
            opt = cmd.option(word)
            skip = opt is not None and opt.takes_value
        else:
            position += 1
    if not positionals:
        return "", []
    a = positionals[min(position, len(positionals) - 1)]
    if position >= len(positionals) and a.kw.get("nargs") not in ("*", "+", "...") \
            and not cmd.remainder:
        return "", []
    return a.complete, list(a.kw.get("choices") or [])


def candidates(s: Session, words: list[str], current: str) -> list[str]:
    """Completions of current, the word after words (the first: the command)."""
    if not words:
        return _matching(current, names(s.shell))
    cmd = lookup(words[0], s.shell)
    if cmd is None:
        return []
    if current.startswith("-"):
        return _matching(current, cmd.options())
    kind, choices = kind_of(cmd, words[1:])
    if choices:
        return _matching(current, [str(c) for c in choices])
    try:
        return list(complete(s, kind, current))
    except (SyscallError, CliError, OSError):  # no kernel, no such directory: nothing
        return []


def complete(s: Session, kind: str, word: str) -> Iterable[str]:
    if kind == "tensor":
        return tensor_paths(s, word)
    if kind == "local":
        return local_paths(word)
    if kind == "pid":  # the ones a signal could reach: not init, not a system process
        return _matching(word, [str(p["pid"]) for p in s.osh.ps()
                                if p["pid"] != 1 and not p.get("system")])
    if kind == "alloc":
        return _matching(word, s.allocs)
    if kind == "signal":
        return _matching(word.upper(), SIGNAL_NAMES)
    if kind == "command":
        return _matching(word, names(s.shell))
    if kind == "syscall":
        return _matching(word, [n for n in BY_NAME if n != "attach"])
    if kind == "log":
        logs = [p.stem for p in (s.home.log / "drivers").glob("*.log")]
        logs += [p.stem for p in (s.home.log / "proc").glob("*.log")]
        return _matching(word, ["kernel", *logs])
    return []


def tensor_paths(s: Session, word: str) -> Iterator[str]:
    tail = word.rsplit("/", 1)[-1]
    head = word[:len(word) - len(tail)]
    directory = s.resolve(head) if head else s.cwd
    for e in s.osh.listdir(directory):
        if e["name"].startswith(tail):
            yield head + e["name"] + ("/" if e["type"] == "dir" else "")


def local_paths(word: str) -> Iterator[str]:
    tail = word.rsplit("/", 1)[-1]
    head = word[:len(word) - len(tail)]
    directory = os.path.expanduser(head) if head else "."
    try:
        found = sorted(os.listdir(directory))
    except OSError:
        return
    for name in found:
        if name.startswith(tail) and (tail.startswith(".") or not name.startswith(".")):
            yield head + name + ("/" if os.path.isdir(os.path.join(directory, name)) else "")


def _matching(word: str, options: Iterable[str]) -> list[str]:
    return [c for c in sorted(options) if c.startswith(word)]


class ShellCompleter:
    """prompt_toolkit's Completer for the shell (made lazily: prompt_toolkit loads
    only with an interactive shell)."""

    def __new__(cls, session: Session) -> Any:
        from prompt_toolkit.completion import Completer, Completion

        class _Completer(Completer):
            def get_completions(self, document: Any, event: Any) -> Iterator[Completion]:
                segment = document.text_before_cursor.rsplit(";", 1)[-1]
                words = segment.split()
                current = "" if not segment or segment[-1].isspace() else words.pop()
                for c in candidates(session, words, current):
                    yield Completion(c, -len(current))

        return _Completer()


# -- the bash and zsh scripts ---------------------------------------------------------

BASH = r'''# bash completion for llmos, from its command table (llmos completion bash)
_llmos() {
    local IFS=$'\n'
    COMPREPLY=($(llmos __complete "$COMP_CWORD" "${COMP_WORDS[@]}" 2>/dev/null))
}
complete -o nospace -o default -F _llmos llmos
'''

ZSH = r'''#compdef llmos
# zsh completion for llmos, from its command table (llmos completion zsh)
_llmos() {
    local -a found
    found=("${(@f)$(llmos __complete $((CURRENT - 1)) "${words[@]}" 2>/dev/null)}")
    compadd -S '' -- "${found[@]}"
}
compdef _llmos llmos
'''


def script(shell: str) -> str:
    return (BASH if shell == "bash" else ZSH).rstrip("\n")


def answer(args: list[str]) -> int:
    """`llmos __complete CWORD llmos WORDS...`: the candidates for word CWORD, one a
    line; a finished word (not a directory) ends in a space, since the scripts ask
    the shell to add none."""
    if not args or not args[0].isdigit():
        return 2
    cword, words = int(args[0]), args[1:]
    current = words[cword] if cword < len(words) else ""
    before = words[1:cword]
    home, uid = None, None
    while before and before[0] in ("--home", "--uid") and len(before) > 1:
        if before[0] == "--home":
            home = before[1]
        elif before[1].isdigit():
            uid = int(before[1])
        before = before[2:]
    session = Session(Home.resolve(home), uid, shell=False, argv=["llmos", "__complete"])
    try:
        if not before and current.startswith("-"):
            found = _matching(current, GLOBAL_OPTIONS)
        else:
            found = candidates(session, before, current)
    finally:
        session.detach()
    for c in found:
        sys.stdout.write(c + ("" if c.endswith("/") else " ") + "\n")
    return 0
