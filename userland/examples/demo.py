"""`make demo`: boot llmos on a temporary home, run the example program, train a
small GPT on the standard library's sources, generate from it, shut it down.

Uses the same `llmos` command a person would, so what it prints is what they see.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLMOS = [sys.executable, "-m", "userland.cli"]


def llmos(*args: str) -> None:
    print(f"\n$ llmos {' '.join(args)}", flush=True)
    subprocess.run([*LLMOS, *args], check=True)


def main() -> int:
    home = tempfile.mkdtemp(prefix="llmos-demo-", dir="/tmp")
    os.environ["LLMOS_HOME"] = home
    try:
        llmos("start")
        try:
            llmos("run", "python", str(HERE / "hello.py"))
            llmos("corpus", "/datasets/pystdlib")       # the stdlib's sources, as bytes
            llmos("train", "demo", "--data", "/datasets/pystdlib")  # 300 steps, 2 workers
            llmos("infer", "/models/demo", "def main(", "-n", "300", "-v", "--seed", "1")
            llmos("jobs", "-a")                              # the job, ended: its loss, checkpoint
            llmos("models")
            llmos("ps")
            llmos("status")
        finally:
            llmos("stop")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
