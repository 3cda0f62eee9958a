"""The training job program: data-parallel training of a byte-level GPT on llmos.

    python -m drivers.executor.train --job NAME --out PATH   the JOB (spawn_train)
    python -m drivers.executor.train --worker                one WORKER (the job's)

The job (_job.py) supervises its workers: attempts, restarts, the watchdog and
stopping; each worker (_worker.py) trains with the loop of trainer.py and rank 0
writes checkpoints (checkpoint.py). ps shows these argv: the executor finds a
running job by "drivers.executor.train" and "--job" in them.

SIGTERM and SIGINT are caught here, before torch is imported, so that a signal
that comes while the program starts asks it to stop like one that comes later:
the first asks to stop cleanly (checkpoint, then exit), a second (the job only)
to stop now. It must never run training itself.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any

USAGE = "usage: python -m drivers.executor.train [--job [NAME] [--out PATH] | --worker]"


def catch_stop_signals() -> tuple[threading.Event, threading.Event]:
    """(stop, force): stop is set by a first SIGTERM or SIGINT, force by the next."""
    stop, force = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        (force if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return stop, force


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        stop, _ = catch_stop_signals()
        from ._worker import worker_main
        return worker_main(stop)
    if argv[:1] in ([], ["--job"]):  # the executor adds "--job NAME --out PATH" for ps
        stop, force = catch_stop_signals()
        from ._job import job_main
        return job_main(stop, force)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
