"""The shape of the code, kept so: no import cycle among llmos's modules, no
private module imported from outside its package, and every command of the
table in both the CLI and the shell (issue 11). These read the source; they
boot nothing."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("syscalls", "kernel", "drivers", "userland")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(include_bench: bool = False) -> dict[str, Path]:
    """Every module of the packages (and bench's scripts) by dotted name."""
    out = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    if include_bench:
        out.update({f"bench.{p.stem}": p for p in (ROOT / "bench").glob("*.py")})
    return out


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that module `name` imports, anywhere in it (a function's
    lazy import counts: it is a dependency all the same), but not under
    `if TYPE_CHECKING:`."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{alias.name}" for alias in node.names]
            if all(sub in known for sub in subs):  # `from pkg import submodule`: the
                found.update(subs)                 # submodule, not pkg's __init__
            else:
                found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known and m != name}


def graph(include_bench: bool = False) -> dict[str, set[str]]:
    mods = sources(include_bench)
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycle_among_the_modules():
    found = cycles(graph())
    assert not found, f"modules that import each other (directly or around a loop): {found}"


def test_the_cycle_check_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def private_imports(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, module) for each private module (a name part starting with _)
    imported from outside the package that holds it."""
    bad = []
    for importer, targets in g.items():
        for target in targets:
            parts = target.split(".")
            private = next((i for i, p in enumerate(parts) if p.startswith("_")
                            and not p.startswith("__")), None)
            if private is None:
                continue
            owner = ".".join(parts[:private])  # the package the private module is in
            if importer != owner and not importer.startswith(owner + "."):
                bad.append((importer, target))
    return sorted(bad)


def test_no_private_module_is_imported_from_outside_its_package():
    bad = private_imports(graph(include_bench=True))
    assert not bad, ("import what a package's __init__ exports instead of its private "
                     f"modules: {bad}")


def test_the_private_import_check_can_fail():
    assert private_imports({"userland.cli": {"syscalls._schema", "userland._views"},
                            "drivers.executor": {"drivers._loop",
                                                 "drivers.tensorfs._shm"}}) == [
        ("drivers.executor", "drivers.tensorfs._shm"), ("userland.cli", "syscalls._schema")]


# -- the command table ------------------------------------------------------------

# The commands that are not in both, and why: a one-shot process has no session to
# change, and a shell must not start or stop the kernel it is attached to.
ONLY = {
    "boot": "cli", "start": "cli", "stop": "cli", "shell": "cli", "completion": "cli",
    "cd": "shell", "pwd": "shell", "exit": "shell",
    # serve runs in the foreground (or -d); keys create takes its uid from the CLI's --uid
    "serve": "cli", "keys": "cli",
    # node token, join and leave, and access, touch this host's files (the head's keys,
    # the node's agent)
    "node": "cli", "access": "cli",
    # cluster builds and removes network namespaces on this host, as root
    "cluster": "cli",
}
# the commands issue 11 found written twice, or only in the shell
NAMED = ("ps jobs run kill sysinfo ls stat put get mkdir rm mv devices corpus train infer "
         "models cat chmod top alloc free wait chat").split()


def test_every_command_is_in_the_cli_and_the_shell():
    from userland._command import commands, lookup
    table = commands()
    assert {n: c.scope for n, c in table.items() if c.scope != "both"} == ONLY
    for name in NAMED:
        assert table[name].scope == "both", name
    for name, cmd in table.items():
        for shell in (False, True):
            here = lookup(name, shell)
            assert (here is cmd) == (cmd.scope in ("both", "shell" if shell else "cli")), \
                (name, shell)
            if here is not None:
                assert cmd.parser(not shell).format_help()  # the parser builds


def test_every_command_declares_what_it_is():
    from syscalls import BY_NAME
    from userland._command import commands
    for name, cmd in commands().items():
        assert cmd.summary and cmd.func.__doc__ is None or cmd.summary, name
        assert set(cmd.syscalls) <= set(BY_NAME), (name, cmd.syscalls)
        for a in cmd.args:
            assert a.kw.get("help") or a.positional or a.kw.get("action") == "store_true", \
                (name, a.flags)
        if cmd.view is not None:
            assert cmd.json_keys, f"{name} prints data: say what its --json holds"


@pytest.mark.parametrize("name", sorted(ONLY) + NAMED)
def test_help_of_each_command_shows_its_defaults(name):
    from userland._command import commands
    cmd = commands()[name]
    text = " ".join(cmd.help_text(cli=cmd.scope != "shell").split())  # unwrapped
    for a in cmd.args:
        d = a.kw.get("default")
        if d not in (None, False, []) and not a.positional:
            assert f"(default: {d})" in text or "default" in (a.kw.get("help") or ""), \
                (name, a.flags)


def test_the_command_reference_is_current():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "userland.gen", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
