"""The llmos kernel: process table, credentials, dispatch, driver supervision.

Never imports torch, a driver or userland; talks to everything through syscalls/.
"""
from ._boot import AlreadyRunning, boot, main
from ._kernel import Kernel
from ._proctable import INIT_PID, Process, ProcessTable

__all__ = ["AlreadyRunning", "INIT_PID", "Kernel", "Process", "ProcessTable", "boot", "main"]
