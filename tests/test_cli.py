"""The llmos command, run as a real program (python -m userland.cli) against real
kernels, each on its own temporary LLMOS_HOME. Every kernel a test starts is
ended at teardown, by pid, with everything under it."""
from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
from conftest import wait_until

import userland
from syscalls.client._proc import stop_kernel
from syscalls import ABI_VERSION, Home

ROOT = Path(__file__).resolve().parent.parent


class CliHome:
    """A temporary LLMOS_HOME and a way to run `llmos` commands on it."""

    def __init__(self) -> None:
        # short path: ipc:// socket paths must fit in sun_path
        self.root = Path(tempfile.mkdtemp(prefix="llmos-cli-", dir="/tmp"))
        self.home = Home.resolve(self.root)
        self.env = dict(os.environ, LLMOS_HOME=str(self.root), PYTHONPATH=str(ROOT))
        self.env.pop("LLMOS_SPAWN_TOKEN", None)
        self.kernel_pids: set[int] = set()
        self.popens: list[subprocess.Popen] = []

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "userland.cli", *args]

    def llmos(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return subprocess.run(self.argv(*args), cwd=ROOT, capture_output=True, text=True,
                              timeout=60, **kw)

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen:
        proc = subprocess.Popen(self.argv(*args), cwd=ROOT, env=self.env, **kw)
        self.popens.append(proc)
        return proc

    def start(self) -> int:
        r = self.llmos("start")
        assert r.returncode == 0, r.stderr
        pid = self.home.kernel_pid()
        assert pid is not None
        self.kernel_pids.add(pid)
        assert r.stdout == f"llmos started on {self.root} (kernel pid {pid})\n"
        return pid

    def drivers_ready(self) -> bool:
        if self.home.kernel_pid() is None or not self.home.secretfile.exists():
            return False
        try:
            with userland.connect(self.root, uid=0, heartbeat=False) as osh:
                return all(d["state"] == "ready" for d in osh.sysinfo()["drivers"])
        except userland.SyscallError:
            return False

    def cleanup(self) -> None:
        pid = self.home.kernel_pid()  # still there if a test failed before stopping
        for kpid in self.kernel_pids | ({pid} if pid else set()):
            _end_kernel(kpid, self.root)
        for proc in self.popens:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _end_kernel(pid: int, root: Path) -> None:
    """Stop the kernel pid on root (SIGTERM, then SIGKILL for it and all it left)."""
    try:
        if str(root) not in " ".join(psutil.Process(pid).cmdline()):
            return  # the pid now names some other process
    except psutil.Error:
        return
    stop_kernel(pid)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _one_error_line(r: subprocess.CompletedProcess, errno: str) -> str:
    """The command failed with exit 1 and exactly one `llmos: ERRNO: ...` line."""
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"llmos: {errno}: "), r.stderr
    return lines[0]


def _ps_rows(text: str) -> dict[int, list[str]]:
    """pid -> [pid, ppid, uid, state, time, resources, command] from `llmos ps`."""
    lines = text.splitlines()
    assert lines[0].split() == ["PID", "PPID", "UID", "STATE", "TIME", "RESOURCES",
                                "COMMAND"]
    rows = [line.split(None, 6) for line in lines[1:]]
    return {int(row[0]): row for row in rows}


@pytest.fixture
def cli_home() -> Iterator[CliHome]:
    h = CliHome()
    try:
        yield h
    finally:
        h.cleanup()


@pytest.fixture(scope="module")
def started() -> Iterator[CliHome]:
    """A kernel started with `llmos start`, shared by tests that leave it running."""
    h = CliHome()
    try:
        h.start()
        yield h
    finally:
        h.cleanup()


# -- a running kernel ----------------------------------------------------------------

def test_status_reports_kernel_and_drivers(started):
    r = started.llmos("status")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"llmos is running on {started.root}\n")
    assert re.search(rf"kernel pid\s+{started.home.kernel_pid()}\n", r.stdout)
    assert re.search(r"^\s+echo\s+ready\s+\d+\s+0$", r.stdout, re.M), r.stdout


def test_second_start_is_refused(started):
    r = started.llmos("start")
    assert r.returncode == 1
    assert r.stderr == (f"llmos is already running on {started.root} "
                        f"(pid {started.home.kernel_pid()})\n")


def test_home_option_overrides_the_environment(started):
    env = dict(started.env, LLMOS_HOME="/nonexistent/llmos")
    before = started.llmos("--home", str(started.root), "status", env=env)
    after = started.llmos("status", "--home", str(started.root), env=env)
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert f"llmos is running on {started.root}" in before.stdout
    assert started.llmos("status", env=env).returncode == 3


def test_ps_lists_init_and_itself(started):
    r = started.llmos("ps")
    assert r.returncode == 0, r.stderr
    rows = _ps_rows(r.stdout)
    assert rows[1][1:4] == ["0", "0", "running"] and rows[1][6] == "init"
    me = [row for row in rows.values() if row[6] == "llmos ps"]  # short, not its venv path
    assert len(me) == 1 and me[0][2] == "1000", r.stdout


def test_run_shows_output_and_passes_on_exit_status(started):
    r = started.llmos("run", "python", "-c",
                      "import sys; print('hello from llmos', flush=True); "
                      "print('to stderr', file=sys.stderr); raise SystemExit(7)")
    assert r.returncode == 7, r.stderr
    assert r.stdout == "hello from llmos\nto stderr\n"  # the program's stderr too
    assert r.stderr == ""


def test_run_with_cwd_and_env(started, tmp_path):
    r = started.llmos("run", "--cwd", str(tmp_path), "-e", "GREETING=hi there", "python",
                      "-c", "import os; print(os.getcwd()); print(os.environ['GREETING'])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(tmp_path), "hi there"]


@pytest.mark.parametrize("uid", ["0", "4242"])
def test_run_as_another_uid(started, uid):
    # run --uid attaches as that uid (as kill --uid does), so even root programs run
    r = started.llmos("run", "--uid", uid, "python", "-c",
                      "import userland; print(userland.connect().uid)")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{uid}\n", "")


def test_run_strips_a_leading_double_dash(started):
    r = started.llmos("run", "--", "python", "-c", "import sys; print(sys.argv[1:])", "--",
                      "x")
    assert (r.returncode, r.stdout, r.stderr) == (0, "['--', 'x']\n", "")


def test_run_of_a_missing_program_is_enoent(started):
    _one_error_line(started.llmos("run", "/nonexistent/program"), "ENOENT")


def test_kill_of_a_nonexistent_pid_is_esrch(started):
    line = _one_error_line(started.llmos("kill", "99999"), "ESRCH")
    assert "99999" in line


def test_run_no_wait_then_kill(started):
    r = started.llmos("run", "--no-wait", "python", "-c", "import time; time.sleep(60)")
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout)
    row = _ps_rows(started.llmos("ps").stdout)[pid]
    assert row[1:4] == ["1", "1000", "running"]  # orphaned when `llmos run` returned
    k = started.llmos("kill", "-s", "KILL", str(pid))
    assert (k.returncode, k.stdout, k.stderr) == (0, "", "")
    assert wait_until(lambda: pid not in _ps_rows(started.llmos("ps").stdout), 10)


def test_run_streams_output_and_ctrl_c_terminates_the_program(started):
    proc = started.popen("run", "python", "-c",
                         "import time; print('ready', 'ctrl-c', flush=True); time.sleep(60)",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the line arrives while the program still runs: output is forwarded as it grows
    assert select.select([proc.stdout], [], [], 30)[0], "no output from llmos run"
    assert proc.stdout.readline() == "ready ctrl-c\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert proc.stderr.read() == ""
    rows = _ps_rows(started.llmos("ps").stdout)
    assert not any("'ctrl-c'" in row[6] for row in rows.values())  # reaped


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_run_forwards_sigterm_and_sighup_and_passes_on_the_status(started, signum):
    proc = started.popen("run", "python", "-c",
                         "import signal, sys, time\n"
                         "def bye(*a):\n"
                         "    print('got TERM', flush=True); sys.exit(5)\n"
                         "signal.signal(signal.SIGTERM, bye)\n"
                         "print('ready', 'forward', flush=True); time.sleep(60)",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert select.select([proc.stdout], [], [], 30)[0], "no output from llmos run"
    assert proc.stdout.readline() == "ready forward\n"
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == 5  # the program's own status, after its handler ran
    assert proc.stdout.read() == "got TERM\n"
    assert proc.stderr.read() == ""
    rows = _ps_rows(started.llmos("ps").stdout)
    assert not any("'forward'" in row[6] for row in rows.values())  # reaped


def _wait_stats() -> str:
    return ("import userland\n"
            "with userland.connect(uid=0, heartbeat=False) as osh:\n"
            "    s = osh.sysinfo()['syscalls'].get('wait', {})\n"
            "print(s.get('count', 0), s.get('errors', 0))")


def test_run_waits_with_one_wait_call(started):
    # no polling in slices: each would count as a wait and an ETIMEDOUT in sysinfo
    def stats() -> tuple[int, int]:
        r = subprocess.run([sys.executable, "-c", _wait_stats()], env=started.env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        count, errors = r.stdout.split()
        return int(count), int(errors)

    before = stats()
    r = started.llmos("run", "python", "-c",
                      "import time; print('a', flush=True); time.sleep(0.5); print('b')")
    assert (r.returncode, r.stdout, r.stderr) == (0, "a\nb\n", "")
    after = stats()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0)


def test_ps_shows_one_line_per_process_whatever_its_arguments(started):
    r = started.llmos("run", "--no-wait", "python", "-c",
                      "import time\nif 1:\n\ttime.sleep(60)  # ps-escape \x1b")
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout)
    try:
        ps = started.llmos("ps")
        assert ps.returncode == 0, ps.stderr
        rows = _ps_rows(ps.stdout)  # every line is a row
        assert rows[pid][6] == ("python -c import time\\nif 1:\\n\\ttime.sleep(60)  "
                                "# ps-escape \\x1b")
    finally:
        started.llmos("kill", "-s", "KILL", str(pid))


def test_sysinfo_text_and_json(started):
    started.llmos("ps")
    r = started.llmos("sysinfo", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kernel_pid"] == started.home.kernel_pid()
    assert "echo" in [d["name"] for d in info["drivers"]]
    assert info["syscalls"]["ps"]["count"] >= 1
    text = started.llmos("sysinfo")
    assert text.returncode == 0, text.stderr
    assert re.search(r"^  echo\s+ready\s", text.stdout, re.M), text.stdout
    assert re.search(r"^  ps\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", text.stdout, re.M)


# -- starting and stopping -------------------------------------------------------------

def test_stop_ends_the_kernel_its_drivers_and_its_processes(cli_home):
    kernel_pid = cli_home.start()
    r = cli_home.llmos("run", "--no-wait", "python", "-c", "import time; time.sleep(60)")
    assert r.returncode == 0, r.stderr
    status = cli_home.llmos("status")
    assert int(re.search(r"kernel pid\s+(\d+)", status.stdout)[1]) == kernel_pid
    driver_pid = int(re.search(r"^\s+echo\s+ready\s+(\d+)", status.stdout, re.M)[1])
    family = [p.pid for p in psutil.Process(kernel_pid).children(recursive=True)]
    assert driver_pid in family and len(family) >= 2  # the driver and the sleeper

    r = cli_home.llmos("stop")
    assert (r.returncode, r.stdout, r.stderr) == (0, "llmos stopped\n", "")
    for pid in [kernel_pid, *family]:
        assert _gone(pid), f"pid {pid} outlived llmos stop"
    for path in ("kernel.sock", "drivers.sock", "kernel.pid", "secret"):
        assert not (cli_home.home.run / path).exists(), path
    r = cli_home.llmos("status")
    assert (r.returncode, r.stdout) == (3, f"llmos is not running on {cli_home.root}\n")
    r = cli_home.llmos("stop")  # stopped already: done, as systemctl stop
    assert (r.returncode, r.stdout, r.stderr) == (
        0, f"llmos is not running on {cli_home.root}\n", "")


def test_run_shows_no_output_of_an_earlier_boot(cli_home):
    # pids start at 1 each boot: logs left by an earlier boot's processes of the
    # same pids must not show up as a new program's output
    procs = cli_home.home.log / "proc"
    procs.mkdir(parents=True)
    for pid in range(1, 200):
        (procs / f"{pid}.log").write_text("stale output\n")
    cli_home.start()
    r = cli_home.llmos("run", "python", "-c", "print('fresh output')")
    assert (r.returncode, r.stdout, r.stderr) == (0, "fresh output\n", "")


def test_start_reports_a_kernel_that_exits_early(cli_home):
    (cli_home.root / "config.toml").write_text("no_such_setting = 1\n")
    r = cli_home.llmos("start")
    assert r.returncode == 1
    assert "the kernel exited with status 2 while starting" in r.stderr
    assert "no_such_setting" in r.stderr  # the tail of kernel.log
    assert cli_home.home.kernel_pid() is None


def test_start_fails_fast_when_a_driver_cannot_start(cli_home):
    (cli_home.root / "config.toml").write_text('drivers = ["echo", "nosuch"]\n')
    r = cli_home.llmos("start", "--timeout", "60")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("llmos: driver nosuch failed while starting (exited with "
                               "status "), r.stderr
    assert lines[0].endswith(f"{cli_home.home.log / 'drivers' / 'nosuch.log'}:")
    assert "No module named drivers.nosuch" in r.stderr  # the tail of the driver's log
    kernel_pid = int(re.search(r"stopped the kernel \(pid (\d+)\)", r.stderr)[1])
    cli_home.kernel_pids.add(kernel_pid)
    assert _gone(kernel_pid)  # the kernel this start launched was stopped
    assert cli_home.llmos("status").returncode == 3


def test_concurrent_starts_one_kernel_and_one_line_each(cli_home):
    procs = [cli_home.popen("start", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(3)]
    results = [(p.wait(timeout=60), p.stdout.read(), p.stderr.read()) for p in procs]
    pid = cli_home.home.kernel_pid()
    assert pid is not None, results
    cli_home.kernel_pids.add(pid)
    started_line = f"llmos started on {cli_home.root} (kernel pid {pid})\n"
    refused = (1, "", f"llmos is already running on {cli_home.root} (pid {pid})\n")
    assert sorted(results) == sorted([(0, started_line, ""), refused, refused])


def test_a_start_that_loses_the_race_says_only_already_running(cli_home):
    # another kernel took the home's lock and has not written its pidfile yet: the
    # kernel this start launched exits with status 1, and start says who runs
    home = cli_home.home
    home.run.mkdir(parents=True)
    with open(home.lockfile, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            proc = cli_home.popen("start", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
            log = home.log / "kernel.log"
            assert wait_until(lambda: log.exists() and "already running" in log.read_text(),
                              30), "the second kernel did not give up"
            home.pidfile.write_text(f"{os.getpid()}\n")  # the winner names itself
            out, err = proc.communicate(timeout=60)
        finally:
            home.pidfile.unlink(missing_ok=True)
    assert (proc.returncode, out, err) == (
        1, "", f"llmos is already running on {cli_home.root} (pid {os.getpid()})\n")


@pytest.mark.parametrize("args", [["start", "--timeout", "-1"], ["stop", "--timeout", "-1"],
                                  ["start", "--timeout", "nan"], ["stop", "--timeout", "abc"],
                                  ["wait", "--timeout", "soon"]])
def test_a_negative_timeout_is_a_usage_error(tmp_path, args):
    home = tmp_path / "a-file"  # a home no kernel could start on, should the check fail
    home.write_text("")
    r = subprocess.run([sys.executable, "-m", "userland.cli", "--home", str(home), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "argument --timeout: wants seconds >= 0" in r.stderr


def test_boot_runs_in_the_foreground_until_sigint(cli_home):
    with open(cli_home.root / "terminal.out", "wb") as out:
        proc = cli_home.popen("boot", stdout=out, stderr=subprocess.STDOUT)
    cli_home.kernel_pids.add(proc.pid)
    assert wait_until(lambda: proc.poll() is not None or cli_home.drivers_ready(), 30)
    assert proc.poll() is None, (cli_home.root / "terminal.out").read_text()
    assert cli_home.home.kernel_pid() == proc.pid  # exec'd: the command is the kernel
    drivers = [p.pid for p in psutil.Process(proc.pid).children()]
    assert drivers
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0
    assert all(_gone(pid) for pid in drivers)
    terminal = (cli_home.root / "terminal.out").read_text()
    assert "llmos kernel down" in terminal  # its log went to the terminal
    assert not (cli_home.home.run / "kernel.sock").exists()


def test_commands_time_out_on_a_stopped_kernel(cli_home):
    kernel_pid = cli_home.start()
    os.kill(kernel_pid, signal.SIGSTOP)
    try:
        env = dict(cli_home.env, LLMOS_CALL_TIMEOUT="1")
        for args in (["ps"], ["status"], ["kill", "2"]):
            r = cli_home.llmos(*args, env=env)
            assert r.stdout == "", args
            _one_error_line(r, "ETIMEDOUT")
    finally:
        os.kill(kernel_pid, signal.SIGCONT)
    assert cli_home.llmos("ps").returncode == 0  # and the kernel goes on


# -- an unusable home -------------------------------------------------------------------

def _llmos(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("LLMOS_SPAWN_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "userland.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", ["start", "boot"])
def test_a_file_as_home_is_one_line(tmp_path, command):
    home = tmp_path / "a-file"
    home.write_text("not a directory\n")
    for path in (home, home / "below"):
        line = _one_error_line(_llmos("--home", str(path), command), "ENOTDIR")
        assert str(path) in line
    assert home.read_text() == "not a directory\n"


@pytest.mark.parametrize("command", ["start", "boot"])
def test_a_home_that_cannot_be_created_is_one_line(command):
    line = _one_error_line(_llmos("--home", "/proc/llmos-no-such-home", command), "ENOENT")
    assert "/proc/llmos-no-such-home" in line


@pytest.mark.parametrize("command", ["start", "boot"])
def test_a_home_too_deep_for_its_sockets_is_one_line(command):
    home = Path("/tmp") / ("llmos-deep-" + "d" * 100)
    try:
        line = _one_error_line(_llmos("--home", str(home), command), "ENAMETOOLONG")
        assert "too deep" in line
        assert not home.exists()  # checked before anything is made or started
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_an_empty_home_is_a_usage_error(cli_home):
    for args in (["--home", "", "status"], ["status", "--home", ""]):
        r = cli_home.llmos(*args)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "argument --home: wants a path" in r.stderr


# -- no kernel ------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["ps"], ["sysinfo"], ["run", "python", "-c", "pass"],
                                  ["kill", "2"]])
def test_commands_without_a_kernel_say_so(cli_home, args):
    r = cli_home.llmos(*args)
    assert r.returncode == 1
    assert r.stderr == f"llmos is not running on {cli_home.root} (start it with: llmos start)\n"
    assert r.stdout == ""


def test_a_stale_pidfile_is_not_a_kernel(cli_home):
    # a SIGKILLed kernel leaves run/kernel.pid and run/kernel.lock (unlocked), and its
    # pid may name another process by now
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        cli_home.home.run.mkdir(parents=True)
        cli_home.home.lockfile.touch()
        cli_home.home.pidfile.write_text(f"{sleeper.pid}\n")
        assert cli_home.llmos("status").returncode == 3
        r = cli_home.llmos("stop")
        assert (r.returncode, r.stdout) == (0, f"llmos is not running on {cli_home.root}\n")
        assert sleeper.poll() is None  # not signalled
    finally:
        sleeper.kill()
        sleeper.wait()


def test_version():
    r = subprocess.run([sys.executable, "-m", "userland.cli", "--version"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert r.stdout == f"llmos {metadata.version('llmos')} (ABI {ABI_VERSION})\n"


def test_no_command_is_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "userland.cli"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "usage: llmos" in r.stderr
