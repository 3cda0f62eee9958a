"""Booting and shutting down one llmos instance on one LLMOS_HOME.

The run directory is guarded by an flock on run/kernel.lock held for the kernel's
life: a second boot on the same home fails with AlreadyRunning instead of
silently stealing the ipc:// sockets (libzmq lets a second bind take the path).
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
from pathlib import Path
from typing import IO

import zmq

from syscalls import Home, parse_sim_spec

from ._kernel import Kernel

log = logging.getLogger("llmos.kernel")


class AlreadyRunning(RuntimeError):
    pass


def _lock(home: Home) -> IO:
    f = open(home.lockfile, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise AlreadyRunning(f"llmos is already running on {home.root} "
                             f"(pid {home.kernel_pid()})") from None
    return f


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def listen_address(text: str) -> str:
    """HOST:PORT checked (PORT 0 or *: any free port); ValueError saying why."""
    host, sep, port = text.removeprefix("tcp://").rpartition(":")
    if not sep or not host or not (port == "*" or port.isdigit() and int(port) < 65536):
        raise ValueError(f"--listen {text!r}: give HOST:PORT, e.g. 10.0.0.1:7700 "
                         "(PORT 0: any free port)")
    return f"{host}:{'*' if port in ('0', '*') else port}"


def boot(home: Home, listen: str | None = None) -> int:
    """Run the kernel in this process until SIGTERM or SIGINT. Returns an exit code.
    listen: HOST:PORT of a CURVE TCP endpoint (none by default)."""
    for d in (home.root, home.run, home.log):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(home.run, 0o700)
    lock = _lock(home)
    try:
        config = home.config()
        for name in ("kernel", "drivers"):  # left by a kernel that was SIGKILLed
            Path(home.socket(name)[len("ipc://"):]).unlink(missing_ok=True)
        try:
            kernel = Kernel(home, config, listen)
        except zmq.ZMQError as e:
            raise ValueError(f"--listen {listen}: {e}") from None
        if kernel.net is not None:  # for llmos node token and llmos access new
            _write_private(home.run / "endpoint", f"{kernel.net.endpoint}\n")
        _write_private(home.secretfile, kernel.secret)
        _write_private(home.pidfile, f"{os.getpid()}\n")

        def stop(signum: int, frame: object) -> None:
            log.info("signal %d: shutting down", signum)
            kernel.running = False

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("llmos kernel %d up on %s", os.getpid(), home.root)
        try:
            kernel.serve()
        finally:
            kernel.shutdown()
            home.pidfile.unlink(missing_ok=True)
            home.secretfile.unlink(missing_ok=True)
            (home.run / "endpoint").unlink(missing_ok=True)
            log.info("llmos kernel down")
    finally:
        lock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m kernel", description="Run the llmos kernel "
                                "in the foreground (the llmos command wraps this).")
    p.add_argument("--home", help="LLMOS_HOME (default: $LLMOS_HOME or ~/.llmos)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="also serve CURVE-authenticated TCP there (docs/scaling.md)")
    p.add_argument("--sim-gpus", metavar="NxSIZE",
                   help="simulated GPUs when there is no real one, e.g. 4x24GiB "
                        "(overrides sim_gpus in config.toml; see docs/devices.md)")
    a = p.parse_args(argv)
    if a.listen:
        try:
            a.listen = listen_address(a.listen)
        except ValueError as e:
            p.error(str(e))
    if a.sim_gpus:
        try:
            parse_sim_spec(a.sim_gpus)
        except ValueError as e:
            p.error(f"--sim-gpus: {e}")
        os.environ["LLMOS_SIM_GPUS"] = a.sim_gpus  # the devices driver reads it
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    home = Home.resolve(a.home)
    os.environ["LLMOS_HOME"] = str(home.root)
    try:
        return boot(home, a.listen)
    except AlreadyRunning as e:
        print(f"llmos: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"llmos: {e}", file=sys.stderr)
        return 2
