"""The commands about the kernel itself: boot, start, stop, status, sysinfo, logs,
and the ways in: shell and completion (docs/cli.md).

boot, start, stop, shell and completion exist only in the CLI: the first three
start or stop the very kernel a shell is attached to, and the last two start a
shell or print a script for one (bash, zsh).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, NoReturn

from syscalls import Errno, SyscallError

from . import _kernelctl as kctl
from . import _views
from ._argtypes import count_arg, seconds, sim_gpus
from ._command import CliError, Session, arg, command, shows

NOT_RUNNING = 3  # status's exit status when no kernel runs (as systemctl's)


def listen_arg(text: str) -> str:
    host, sep, port = text.removeprefix("tcp://").rpartition(":")
    if not sep or not host or not (port == "*" or port.isdigit() and int(port) < 65536):
        raise argparse.ArgumentTypeError(f"{text!r}: give HOST:PORT, e.g. 10.0.0.1:7700 "
                                         "(PORT 0: any free port)")
    return text.removeprefix("tcp://")


LISTEN = arg("--listen", metavar="HOST:PORT", type=listen_arg,
             help="also serve CURVE-authenticated TCP there, for nodes and remote clients "
                  "(docs/scaling.md)")
SIM_GPUS = arg("--sim-gpus", metavar="NxSIZE", type=sim_gpus,
               help="simulated GPUs when there is no real one, e.g. 4x24GiB (overrides "
                    "sim_gpus in config.toml; docs/devices.md)")


@command("boot", "kernel", "run the kernel in the foreground, logging to the terminal; "
         "Ctrl-C shuts it down", arg("-v", "--verbose", action="store_true",
                                     help="debug logging"), SIM_GPUS, LISTEN,
         scope="cli")
def boot(s: Session, a: argparse.Namespace) -> NoReturn:
    """Become the kernel: exec, so that Ctrl-C reaches the kernel itself."""
    kctl.local_only("boot")
    kctl.prepare_home(s.home)
    pid = kctl.running_kernel(s.home)
    if pid is not None:
        raise CliError(f"llmos is already running on {s.home.root} (pid {pid})")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, kctl.kernel_argv(s.home, a.verbose, a.sim_gpus, a.listen),
              kctl.kernel_env(s.home))


@command("start", "kernel", "start the kernel in the background and wait until its "
         "drivers are ready",
         arg("--timeout", type=seconds, default=kctl.START_TIMEOUT_S, metavar="S",
             help="seconds to wait for ready; then the kernel is left running"),
         SIM_GPUS, LISTEN, scope="cli",
         details="A driver that dies before it is ever ready stops the start at once: "
                 "its log's end is shown and the kernel is stopped.")
def start(s: Session, a: argparse.Namespace) -> None:
    kctl.local_only("start")
    import subprocess
    home = s.home
    kctl.prepare_home(home)
    pid = kctl.running_kernel(home)
    if pid is not None:
        raise CliError(f"llmos is already running on {home.root} (pid {pid})")
    offsets = kctl.log_sizes(home)
    with open(home.kernel_log, "ab") as out:
        # its own session: the kernel outlives this command and ignores our terminal;
        # cwd: a daemon must not pin whatever directory it was started from
        kernel = subprocess.Popen(kctl.kernel_argv(home, sim_gpus=a.sim_gpus,
                                                   listen=a.listen),
                                  env=kctl.kernel_env(home), cwd=home.root,
                                  stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + a.timeout
    watch = kctl.DriverWatch(home, kernel.pid)
    try:
        _wait_ready(s, a, kernel, watch, deadline, offsets)
    finally:
        watch.close()
    s.line(f"llmos started on {home.root} (kernel pid {kernel.pid})")
    if a.listen:
        try:
            endpoint = (home.run / "endpoint").read_text().strip()
        except OSError:
            endpoint = a.listen
        s.line(f"listening on {endpoint} (CURVE; llmos node token NAME, llmos access new "
               "NAME make keys)")


def _wait_ready(s: Session, a: argparse.Namespace, kernel: Any, watch: Any,
                deadline: float, offsets: dict[Any, int]) -> None:
    """Until every driver of the new kernel is ready; CliError when it will not be."""
    home = s.home
    while True:
        drivers = watch.drivers(deadline)
        if drivers is not None:
            if all(d["state"] == "ready" for d in drivers):
                break
            # a driver that died before it was ever ready is crash-looping (a bad
            # drivers setting, a driver that cannot import): do not wait it out
            failed = [d for d in drivers if d["state"] != "ready"
                      and (d["restarts"] > 0 or d["last_exit"])]
            if failed:
                kctl.stop(kernel.pid, kctl.STOP_TIMEOUT_S)
                kernel.wait()
                raise CliError(_drivers_failed(s, kernel.pid, failed, offsets))
        status = kernel.poll()
        if status is not None:
            # lost the race with another start on this home: its kernel holds the lock
            other = kctl.other_kernel(home, kernel.pid, deadline)
            if other is not None:
                raise CliError(f"llmos is already running on {home.root} (pid {other})")
            tail = kctl.log_tail(home.kernel_log, offsets.get(home.kernel_log, 0))
            raise CliError(f"llmos: the kernel exited with status {status} while starting "
                           f"({home.kernel_log}):\n{tail}")
        if time.monotonic() >= deadline:
            raise CliError(f"llmos: the kernel (pid {kernel.pid}) is not ready after "
                           f"{a.timeout:g}s; see {home.kernel_log} (stop it with: llmos "
                           "stop)")
        time.sleep(kctl.POLL_S)


def _drivers_failed(s: Session, kernel_pid: int, failed: list[dict[str, Any]],
                    offsets: dict[Any, int]) -> str:
    lines = []
    for d in failed:
        path = s.home.driver_log(d["name"])
        lines.append(f"llmos: driver {d['name']} failed while starting "
                     f"({d['last_exit'] or 'restarting'}); the end of {path}:")
        lines.append(kctl.log_tail(path, offsets.get(path, 0)) or "(empty)")
    lines.append(f"llmos: stopped the kernel (pid {kernel_pid}); fix the driver or the "
                 f"drivers setting in {s.home.root / 'config.toml'}")
    return "\n".join(lines)


@command("stop", "kernel", "stop the kernel: SIGTERM, then SIGKILL (it and every process "
         "it started) after the timeout",
         arg("--timeout", type=seconds, default=kctl.STOP_TIMEOUT_S, metavar="S",
             help="seconds to wait before SIGKILL"), scope="cli",
         details="Not running: it says so and exits 0, as systemctl stop does.")
def stop(s: Session, a: argparse.Namespace) -> None:
    kctl.local_only("stop")
    pid = kctl.running_kernel(s.home)
    if pid is None:
        s.line(f"llmos is not running on {s.home.root}")
        return
    if not kctl.stop(pid, a.timeout):
        s.note(f"llmos: the kernel did not stop within {a.timeout:g}s: killed it and its "
               "processes")
    s.line("llmos stopped")


def status_lines(info: dict[str, Any], s: Session, a: argparse.Namespace) -> list[str]:
    if not info["running"]:
        return [f"llmos is not running on {info['home']}"]
    procs = info["processes"]
    return [f"llmos is running on {info['home']}",
            f"  kernel pid  {info['kernel_pid']}",
            f"  uptime      {_views.duration(info['uptime_s'])}",
            f"  processes   {procs['total']} ({procs['running']} running, "
            f"{procs['zombie']} zombie)",
            "  drivers",
            *_views.indented(_views.table(
                ["NAME", "STATE", "OS PID", "RESTARTS"],
                [[d["name"], d["state"], d["os_pid"], d["restarts"]]
                 for d in info["drivers"]], "llrr"), "    ")]


@command("status", "kernel", "is the kernel up: its pid, uptime, processes and drivers "
         "(exit status 3 when it is not running)", syscalls=("sysinfo",),
         view=status_lines,
         json_keys="{running, home, kernel_pid, uptime_s, processes: {total, running, "
                   "zombie}, drivers: [{name, state, os_pid, restarts, ...}]}")
def status(s: Session, a: argparse.Namespace) -> dict[str, Any]:
    kctl.local_only("status")
    if kctl.running_kernel(s.home) is None:
        s.status = NOT_RUNNING
        return {"running": False, "home": str(s.home.root)}
    info = s.osh.sysinfo()
    return {"running": True, "home": info["home"], "kernel_pid": info["kernel_pid"],
            "uptime_s": info["uptime_s"], "processes": info["processes"],
            "drivers": info["drivers"]}


shows("sysinfo", "kernel", "kernel statistics: processes, drivers, per-syscall counts and "
      "latencies, dropped messages", lambda info, s: _views.sysinfo_lines(info),
      "sysinfo()'s record: uptime_s, boot_time, kernel_pid, abi, home, hostname, "
      "processes, drivers, waiting, syscalls, dropped")


def log_path(s: Session, target: str) -> Any:
    """The log file of a pid, "kernel" or a driver's name."""
    if target == "kernel":
        return s.home.kernel_log
    if target.isdigit():
        path = s.home.proc_log(int(target))
        if not path.exists():
            raise SyscallError(Errno.ENOENT, f"logs: no log for pid {target} here: only "
                               "a process llmos spawned (llmos run, spawn) has one, in "
                               f"{path.parent} for this node's; a process on another "
                               "node has it in that node's home (llmos ps shows NODE)")
        return path
    path = s.home.driver_log(target)
    if not path.exists():
        known = sorted(p.stem for p in (s.home.log / "drivers").glob("*.log"))
        raise SyscallError(Errno.ENOENT, f"logs: {target!r} is not a pid, kernel or a "
                           f"driver ({', '.join(known) or 'none has logged yet'})")
    return path


@command("logs", "kernel", "show a log: a spawned process's output, the kernel's or a "
         "driver's; -f follows it",
         arg("target", metavar="PID|kernel|DRIVER", complete="log",
             help="a pid, kernel, or a driver's name (echo, devices, tensorfs, executor)"),
         arg("-f", "--follow", action="store_true",
             help="keep printing what is added: until the process ends, or Ctrl-C"),
         arg("-n", "--lines", type=count_arg, metavar="N",
             help="only the last N lines (default: all)"),
         details="Reads $LLMOS_HOME/log/proc/PID.log, log/kernel.log or "
                 "log/drivers/DRIVER.log. pids are never reused on a home, so a pid's "
                 "log is that one process's, whatever boot ran it.")
def logs(s: Session, a: argparse.Namespace) -> None:
    kctl.local_only("logs")
    path = log_path(s, a.target)
    size = path.stat().st_size
    text = kctl.log_tail(path, 0, a.lines)
    if text:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()
    if not a.follow:
        return
    tail = kctl.LogTail(path, sys.stdout.buffer, offset=size)
    tail.start()
    try:
        while not (a.target.isdigit() and _ended(s, int(a.target))):
            time.sleep(0.25)
    except KeyboardInterrupt:
        s.status = 130  # as after any Ctrl-C
    finally:
        tail.stop()


def _ended(s: Session, pid: int) -> bool:
    """Process pid is no longer running (or the kernel is gone: nothing more comes)."""
    if kctl.running_kernel(s.home) is None:
        return True
    return not any(p["pid"] == pid and p["state"] == "running" for p in s.osh.ps())


@command("shell", "kernel", "the interactive shell (docs/shell.md): every command of "
         "this table at a prompt; -c runs commands, a script comes on stdin",
         arg("-c", dest="commands", metavar="COMMANDS",
             help='commands separated by ";" or newlines, e.g. "ps; ls /"'),
         scope="cli")
def shell(s: Session, a: argparse.Namespace) -> None:
    kctl.local_only("shell")
    from .shell import main as shell_main
    s.status = shell_main(s.home, a.commands, s.uid)


@command("completion", "kernel", "print a TAB completion script for bash or zsh, made "
         "from this command table",
         arg("shell_name", metavar="SHELL", choices=["bash", "zsh"],
             help="bash or zsh"),
         scope="cli",
         details='Load it with: eval "$(llmos completion bash)" (or zsh), or save it '
                 "where your shell reads completions. It asks llmos itself for "
                 "candidates (tensorfs paths, pids) each time TAB is pressed.")
def completion(s: Session, a: argparse.Namespace) -> None:
    from ._complete import script
    s.line(script(a.shell_name))
