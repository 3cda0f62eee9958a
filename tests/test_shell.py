"""The llmos shell (`llmos shell`), run as a real program against one real kernel:
commands through -c and through a script on stdin, each family, the errors (one
line each, never a traceback) and the exit status; and through a pseudo-terminal
with pexpect, the way a person uses it: the prompt, tables, TAB completion, help,
an error, top, exit."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pexpect
import pytest
from conftest import Booted

from syscalls import Errno, Home, SyscallError
from test_executor import write_model
from userland._command import Session
from userland.shell import Shell, parse_line

ROOT = Path(__file__).resolve().parent.parent
TINY_TRAIN = ("steps=10 n_layer=1 n_head=2 n_embd=32 block_size=16 batch_size=8 workers=1 "
              "log_every=5 checkpoint_every=10 warmup=2 lr=3e-3")
FOX = "the quick brown fox jumps over the lazy dog. " * 200


@pytest.fixture(scope="module")
def kernel() -> Iterator[Booted]:
    with Booted() as b:
        with b.connect() as osh:
            write_model(osh, "/models/tiny")
        yield b


def env_for(kernel: Booted, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), LLMOS_HOME=str(kernel.root), **extra)
    env.pop("LLMOS_SPAWN_TOKEN", None)
    return env


def shell(kernel: Booted, commands: str | None = None, script: str = "",
          cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`llmos shell -c COMMANDS`, or `llmos shell` with script on stdin."""
    argv = [sys.executable, "-m", "userland.cli", "--home", str(kernel.root), "shell"]
    if commands is not None:
        argv += ["-c", commands]
    return subprocess.run(argv, cwd=cwd, env=env_for(kernel), input=script,
                          capture_output=True, text=True, timeout=120)


def ok(r: subprocess.CompletedProcess) -> str:
    assert (r.returncode, r.stderr) == (0, ""), (r.stdout, r.stderr)
    return r.stdout


def rows(out: str) -> dict[str, list[str]]:
    """The rows of the tables in out, by their first cell."""
    return {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}


# -- the command line ----------------------------------------------------------------

def test_parse_line_splits_on_semicolons_outside_quotes() -> None:
    assert parse_line('ls -l /a; infer m "x; y" # a comment; not a command') == [
        ["ls", "-l", "/a"], ["infer", "m", "x; y"]]
    assert parse_line(r"echo a\;b;; stat 'it''s'#x") == [["echo", "a;b"], ["stat", "its#x"]]
    assert parse_line("   # only a comment") == []
    with pytest.raises(ValueError):
        parse_line('cat "unclosed')


def test_an_unexpected_exception_is_one_eio_line(capsys: Any) -> None:
    class Broken:
        pid, uid, timeout = 5, 1000, 10.0

        def ps(self, all: bool = False) -> Any:
            raise RuntimeError("boom")

        def stat(self, path: str) -> Any:
            raise SyscallError(Errno.ENOENT, f"{path}: no such tensor or directory")

    session = Session(Home.resolve("/tmp/llmos-nowhere"), shell=True)
    session._osh = Broken()
    sh = Shell(session, interactive=False)
    assert sh.execute(["ps"]) is False
    assert sh.execute(["stat", "x"]) is False  # relative to the working directory
    assert sh.execute(["ls", "-z"]) is False
    err = capsys.readouterr().err.splitlines()
    assert err == ["EIO: internal error: RuntimeError: boom",
                   "ENOENT: /x: no such tensor or directory",
                   "usage: ls [-l] [--json] [-h] [PATH ...] (unrecognized arguments: -z)"]


# -- -c and scripts: each family -----------------------------------------------------

def test_process_commands(kernel: Booted) -> None:
    out = ok(shell(kernel, "ps; jobs; sysinfo; top; run python -c \"print('hi from run')\""))
    table = rows(out.split("no jobs")[0])  # ps's table
    assert table["PID"][:7] == ["PID", "PPID", "UID", "STATE", "TIME", "RESOURCES", "COMMAND"]
    assert table["1"][1:4] == ["0", "0", "running"] and table["1"][-1] == "init"
    me = [line for line in out.splitlines() if line.endswith(" llmos shell")]
    assert me and me[0].split()[2] == "1000", out  # the shell is a process: ps shows it
    assert "no jobs" in out
    assert re.search(r"^\s+echo\s+ready\s+\d+\s+0\s", out, re.M), out  # sysinfo's drivers
    assert re.search(r"^\s+ps\s+\d+\s+\d+\s+[\d.]+", out, re.M), out  # and its syscalls
    assert "llmos top" in out and "PER S" in out  # one snapshot when not on a terminal
    assert "hi from run\n" in out


def test_run_detached_wait_kill_and_their_status(kernel: Booted) -> None:
    r = shell(kernel, "run -d python -c 'raise SystemExit(4)'; wait --timeout 60")
    pid = int(r.stdout.splitlines()[0])
    assert f"pid {pid} exited with status 4" in r.stdout
    assert r.returncode == 1 and r.stderr == ""  # wait fails as its child did
    r = shell(kernel, "run python -c 'raise SystemExit(3)'")
    assert r.returncode == 1 and "exited with status 3" in r.stderr
    with kernel.connect() as osh:
        sleeper = osh.spawn(["python", "-c", "import time; time.sleep(60)"])
        ok(shell(kernel, f"kill -s KILL {sleeper}"))
        assert osh.wait(sleeper, timeout=30)["status"] == -9


def test_tensor_commands(kernel: Booted, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    (tmp_path / "fox.txt").write_text(FOX)
    out = ok(shell(kernel, "mkdir -p /t/sub; cd /t; put -q a.npy a; ls; ls -l; stat a; "
                   "cat a; mv a sub; chmod 600 sub/a; get -q sub/a b.npy; cd sub; pwd; "
                   "cd -; pwd; ls /t/sub; corpus /t/text/fox fox.txt; cat text/fox",
                   cwd=tmp_path))
    assert np.array_equal(np.load(tmp_path / "b.npy"), np.arange(12).reshape(3, 4))
    lines = out.splitlines()
    assert lines[:2] == ["a", "sub/"]  # ls in /t
    assert re.search(r"^-rw-r--r--\s+1000\s+48B\s.*float32\[3, 4\]\s+a$", out, re.M), out
    assert re.search(r"^drwxr-xr-x\s+1000\s+-\s.*\ssub/$", out, re.M), out
    assert "path      /t/a" in lines and "mode      0644 (-rw-r--r--)" in lines
    assert "min     0  max 11  mean 5.5  std 3.45205" in lines  # cat: a summary
    assert "values  [0, 1, 2, 3, 4, 5, 6, 7, ... (4 more)]" in lines
    at = lines.index("/t/sub")  # pwd, cd -, pwd, ls, then corpus (which made /t/text)
    assert lines[at:at + 4] == ["/t/sub", "/t", "a", f"/t/text/fox: {len(FOX):,} bytes of text"]
    assert "dtype   uint8" in lines and "text    'the quick brown fox jumps " \
        "over the lazy dog. the quick brown" in out  # cat shows a dataset's text
    with kernel.connect() as osh:
        assert osh.stat("/t/sub/a")["mode"] == 0o600
    ok(shell(kernel, "rm -r /t"))
    with kernel.connect() as osh:
        assert "t" not in [e["name"] for e in osh.listdir("/")]


def test_group_commands(kernel: Booted, tmp_path: Path) -> None:
    """put -g stores a multi-tensor file as one group; ls, stat and cat show its
    members; get writes it back with its names, and refuses a .npy."""
    from safetensors.numpy import load_file, save_file
    save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3),
               "n": np.array([7], np.int64)}, tmp_path / "ck.safetensors")
    out = ok(shell(kernel, "put -q -g ck.safetensors /ck; ls -l /; stat /ck; cat /ck; "
                   "get -q /ck back.safetensors", cwd=tmp_path))
    assert re.search(r"^-rw-r--r--\s+1000\s+32B\s.*\s2 tensors\s+ck$", out, re.M), out
    assert "type      group" in out and "  w  float32[2, 3]  24B" in out
    assert "/ck[w]" in out and "/ck[n]" in out and "values  [7]" in out
    back = load_file(tmp_path / "back.safetensors")
    assert back["w"].tolist() == [[0, 1, 2], [3, 4, 5]] and back["n"].tolist() == [7]
    r = shell(kernel, "get /ck x.npy", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("EINVAL: get: /ck is a group")
    ok(shell(kernel, "rm /ck"))


def test_device_commands(kernel: Booted) -> None:
    out = ok(shell(kernel, "alloc 1MiB --count 2; devices; free --all; devices"))
    alloc = out.split()[0]
    before, after = out.split("cpus ")[1:]
    assert len(re.findall(rf"^\s+{alloc} \*\s", before, re.M)) == 2, out  # one per GPU, ours
    assert "allocations\n  (none)" in after
    assert re.search(r"^\s+0\s+\S+\s+.*1MiB", before, re.M), out  # the GPU's ALLOCATED


def test_model_commands(kernel: Booted) -> None:
    with kernel.connect() as osh:
        greedy = osh.infer("/models/tiny", "hello", max_tokens=12, temperature=0)["text"]
        chat = [osh.infer("/models/tiny", p, 6, temperature=0)["text"] for p in ("ab", "cd")]
    out = ok(shell(kernel, "infer /models/tiny hello -n 12 -t 0; cd /models; "
                   "infer -q tiny hello -n 12 -t 0; models"))
    assert out.startswith(f"hello{greedy}\n{greedy}\n"), out
    assert re.search(r"^/models/tiny/step-000001\s+\S+\s+1\s+5\.500\s+\d+$", out, re.M), out
    # chat reads its lines from the script, up to an empty line
    out = ok(shell(kernel, script="chat /models/tiny -n 6 -t 0\nab\ncd\n\npwd\n"))
    assert out == f"ab{chat[0]}\ncd{chat[1]}\n/\n"


@pytest.mark.slow
def test_train_command(kernel: Booted, tmp_path: Path) -> None:
    (tmp_path / "fox.txt").write_text(FOX)
    out = ok(shell(kernel, f"corpus /datasets/fox {tmp_path / 'fox.txt'}; "
                   f"train fox --data /datasets/fox {TINY_TRAIN}; jobs"))
    assert re.search(r"^training job \d+: fox on /datasets/fox", out, re.M), out
    assert re.search(r"^done  step 10/10 \[#+\]  loss [\d.]+ \(from [\d.]+\)", out, re.M), out
    assert "checkpoint: /models/fox/step-000010\n" in out


def test_help(kernel: Booted) -> None:
    out = ok(shell(kernel, "help; help kill; rm --help"))
    for name in ("ps", "top", "jobs", "wait", "run", "kill", "sysinfo", "ls", "cd", "stat",
                 "cat", "put", "get", "rm", "mv", "mkdir", "chmod", "devices", "alloc", "free",
                 "train", "chat", "infer", "models", "corpus", "syscall", "help", "exit"):
        assert re.search(rf"^  {name}\s+\w", out, re.M), name
    assert "usage: kill [-s SIG] [-h] PID [PID ...]\n" in out
    assert "usage: rm [-r] [-h] PATH [PATH ...]\n" in out
    assert "(default: TERM)" in out  # each argument's default, from the table


def test_errors_are_one_line_and_the_shell_goes_on(kernel: Booted) -> None:
    failing = [("stat /nope", "ENOENT: "), ("sp", "ENOSYS: sp: unknown command; did you "
                                            "mean 'ps'?"),
               ("kill abc", "usage: kill [-s SIG] [-h] PID [PID ...] ("),
               ("kill 99999", "ESRCH: "), ("cat /models", "EISDIR: "),
               ("rm /models", "ENOTEMPTY: "), ("chmod 9 /models", "usage: chmod"),
               ("wait", "ECHILD: "), ("infer /nope hi", "ENOENT: "),
               ("put /nonexistent.npy /x", "ENOENT: "), ("alloc 1000TiB", "ENOMEM: "),
               ("free bogus", "EBADF: "), ("syscall nope", "ENOSYS: "),
               ("train x --data /nope", "ENOENT: "), ("cd /models/tiny/latest", "ENOTDIR: ")]
    r = shell(kernel, "; ".join(cmd for cmd, _ in failing) + "; pwd")
    assert (r.returncode, r.stdout) == (1, "/\n"), r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == len(failing), r.stderr
    for line, (cmd, start) in zip(lines, failing):
        assert line.startswith(start), (cmd, line)
    r = shell(kernel, "stat 'unclosed")
    assert (r.returncode, r.stderr) == (1, "EINVAL: cannot parse the line: no closing "
                                           "quotation\n")


def test_exit_status_of_commands_and_scripts(kernel: Booted) -> None:
    assert shell(kernel, "stat /nope; exit 0").returncode == 0
    assert shell(kernel, "stat /nope; exit").returncode == 1
    r = shell(kernel, "exit 7; pwd")
    assert (r.returncode, r.stdout) == (7, "")
    r = shell(kernel, script="# a script\npwd  # where\n\ncd /models; pwd\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, "/\n/models\n", "")
    r = shell(kernel, script="stat /nope\nexit\npwd\n")
    assert (r.returncode, r.stdout) == (1, "")


def test_no_kernel_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "userland.cli", "--home", str(tmp_path),
                        "shell", "-c", "ps"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"llmos is not running on {tmp_path} (start it with: llmos start)\n"


# -- a person at a terminal ----------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>78]"
                  r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


class Terminal:
    """The shell on a pseudo-terminal; expect() matches what it wrote, escape
    sequences removed (prompt_toolkit moves the cursor rather than write spaces)."""

    def __init__(self, kernel: Booted) -> None:
        env = env_for(kernel, TERM="xterm", NO_COLOR="1", PROMPT_TOOLKIT_NO_CPR="1")
        env.pop("COLUMNS", None)
        env.pop("LINES", None)
        self.child = pexpect.spawn(sys.executable, ["-m", "userland.cli", "--home",
                                                    str(kernel.root), "shell"],
                                   cwd=str(ROOT), env=env, dimensions=(50, 160),
                                   encoding="utf-8", codec_errors="replace")
        self.raw = ""
        self.pos = 0

    def text(self) -> str:
        return ANSI.sub("", self.raw).replace("\r", "")

    def expect(self, pattern: str, timeout: float = 30) -> re.Match:
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.text(), self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in {self.text()[self.pos:]!r}")
            try:
                self.raw += self.child.read_nonblocking(65536, 0.1)
            except pexpect.TIMEOUT:
                pass
            except pexpect.EOF:
                if not regex.search(self.text(), self.pos):
                    raise AssertionError(f"EOF before {pattern!r}: "
                                         f"{self.text()[self.pos:]!r}") from None

    def prompt(self, cwd: str = "/") -> None:
        self.expect(rf"llmos:{re.escape(cwd)}\$")

    def type(self, text: str) -> None:
        self.child.send(text)

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        self.child.close()


def test_interactive_session(kernel: Booted) -> None:
    (kernel.root / "shell_history").unlink(missing_ok=True)
    t = Terminal(kernel)
    try:
        t.expect(r"llmos shell, pid (\d+)")
        t.prompt()
        t.type("ps\r")
        t.expect(r"PID\s+PPID\s+UID\s+STATE\s+TIME\s+RESOURCES\s+COMMAND")
        t.expect(r"^\s+1\s+0\s+0\s+running\s.*init")
        t.prompt()
        t.type("sysi\t")  # a command name
        t.expect(r"sysinfo")
        t.type("\r")
        t.expect(r"^kernel\s+pid \d+")
        t.prompt()
        t.type("stat /mod\t")  # a tensorfs path
        t.expect(r"stat /models/")
        t.type("ti\t")
        t.expect(r"tiny/")
        t.type("\r")
        t.expect(r"^path\s+/models/tiny$")
        t.prompt()
        t.type("cd /models/tiny\r")
        t.prompt("/models/tiny")
        t.type("cat lat\t")  # relative to the working directory
        t.expect("latest")
        t.type("\r")
        t.expect(r"^text\s+'step-000001'")
        t.prompt("/models/tiny")
        t.type("help\r")
        t.expect(r"^  chat\s+talk to a model")
        t.prompt("/models/tiny")
        t.type("stat nope\r")
        t.expect(r"^ENOENT: /models/tiny/nope: no such tensor or directory$")
        t.prompt("/models/tiny")
        t.type("run python -c \"print('from', 'a child')\"\r")
        t.expect(r"^from a child$")
        t.prompt("/models/tiny")
        t.type("top\r")
        t.expect(r"q or Ctrl-C leaves")
        t.type("q")
        t.prompt("/models/tiny")
        t.type("half a line\x03")  # Ctrl-C drops the line
        t.prompt("/models/tiny")
        t.type("exit\r")
        t.child.expect(pexpect.EOF, timeout=30)
        t.child.close()
        assert t.child.exitstatus == 0
        history = (kernel.root / "shell_history").read_text()
        assert "\n+ps\n" in history and "\n+cd /models/tiny\n" in history
        assert "half a line" not in history
    finally:
        t.close()
