"""TAB completion for the llmos shell: command names, then what each argument of
the command is (Command.complete): tensorfs paths (listdir through the shell's
own connection), local files, pids (ps), the shell's allocations, signal names,
command and syscall names, and option names after a -."""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from syscalls import BY_NAME, SyscallError
from userland import _shell_commands as cmds


class ShellCompleter(Completer):
    def __init__(self, shell: Any) -> None:
        self.sh = shell

    def get_completions(self, document: Document,
                        event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        segment = text.rsplit(";", 1)[-1]
        words = segment.split()
        at_space = not segment or segment[-1].isspace()
        if not words or (len(words) == 1 and not at_space):
            yield from _matching(words[0] if words else "", cmds.names())
            return
        cmd = cmds.lookup(words[0])
        if cmd is None:
            return
        current = "" if at_space else words[-1]
        before = words[1:] if at_space else words[1:-1]
        if current.startswith("-"):
            yield from _matching(current, cmd.options())
            return
        kind = self.kind(cmd, before)
        try:
            yield from self.complete(kind, current)
        except SyscallError:  # a path that is not there, a kernel that went away
            return

    @staticmethod
    def kind(cmd: cmds.Command, before: list[str]) -> str:
        """What the next argument of cmd is, after the words before it."""
        if before and before[-1].startswith("-") and cmd.takes_value(before[-1]):
            return cmd.option_complete.get(before[-1], "")
        position, skip = 0, False
        for word in before:
            if skip:
                skip = False
            elif word.startswith("-") and len(word) > 1:
                skip = cmd.takes_value(word)
            else:
                position += 1
        if not cmd.complete:
            return ""
        return cmd.complete[min(position, len(cmd.complete) - 1)]

    def complete(self, kind: str, word: str) -> Iterable[Completion]:
        if kind == "tensor":
            return self.tensor_paths(word)
        if kind == "local":
            return local_paths(word)
        if kind == "pid":
            procs = self.sh.osh.ps()
            return [Completion(str(p["pid"]), -len(word), display_meta=" ".join(p["argv"]))
                    for p in sorted(procs, key=lambda p: p["pid"])
                    if str(p["pid"]).startswith(word)]
        if kind == "alloc":
            return _matching(word, self.sh.allocs)
        if kind == "signal":
            return _matching(word.upper(), ["TERM", "KILL", "INT"], len(word))
        if kind == "command":
            return _matching(word, cmds.names())
        if kind == "syscall":
            return _matching(word, [n for n in BY_NAME if n != "attach"])
        return []

    def tensor_paths(self, word: str) -> Iterator[Completion]:
        tail = word.rsplit("/", 1)[-1]
        head = word[:len(word) - len(tail)]
        directory = self.sh.resolve(head) if head else self.sh.cwd
        for e in self.sh.osh.listdir(directory):
            name = e["name"]
            if name.startswith(tail):
                slash = "/" if e["type"] == "dir" else ""
                yield Completion(head + name + slash, -len(word), display=name + slash)


def local_paths(word: str) -> Iterator[Completion]:
    tail = word.rsplit("/", 1)[-1]
    head = word[:len(word) - len(tail)]
    directory = os.path.expanduser(head) if head else "."
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return
    for name in names:
        if name.startswith(tail) and (tail.startswith(".") or not name.startswith(".")):
            slash = "/" if os.path.isdir(os.path.join(directory, name)) else ""
            yield Completion(head + name + slash, -len(word), display=name + slash)


def _matching(word: str, candidates: Iterable[str], replace: int | None = None
              ) -> Iterator[Completion]:
    for c in sorted(candidates):
        if c.startswith(word):
            yield Completion(c, -(len(word) if replace is None else replace))
