"""A child for hello.py: says who it is, then ends with the status it was given."""
import sys

import userland

status = int(sys.argv[1]) if len(sys.argv) > 1 else 0
with userland.connect() as osh:
    print(f"  child: llmos pid {osh.getpid()}, parent {osh.getppid()}, uid {osh.uid}")
    osh.exit(status)
