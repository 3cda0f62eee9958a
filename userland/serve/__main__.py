"""python -m userland.serve: what `llmos serve -d` spawns (the same as llmos serve)."""
from __future__ import annotations

import argparse
import logging
import sys

from syscalls import Home, SyscallError

from . import run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m userland.serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uid", type=int, default=None)
    p.add_argument("--home", default=None)
    p.add_argument("--replica-threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve %(levelname)s %(message)s")
    try:
        return run(Home.resolve(a.home), a.host, a.port, a.uid, a.replica_threads)
    except SyscallError as e:
        print(f"llmos serve: {e.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
