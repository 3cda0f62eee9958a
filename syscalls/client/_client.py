"""The client library's core (llmos's libc): one connection to the kernel, bound to one process.

connect() attaches this Python process to llmos: with the spawn token the kernel
gave it (LLMOS_SPAWN_TOKEN, when the kernel started it) or with the home's secret
(run/secret, mode 0600, when it attaches from the host). From then on every
request on the connection is made as that process; the kernel, not the client,
says which pid and uid it is.

A second connection in a daemon thread sends heartbeats, so the kernel notices a
process that froze or died within a few heartbeat periods. A reply is awaited in
one-second slices; between them the library checks the kernel is alive, so a dead
kernel gives EIO, never a hang. A kernel that restarted since this handle
attached knows neither the connection nor its process (a reboot ends
processes): every call then raises ConnectionLost (ECONNRESET, "the llmos kernel
restarted"); connect() again for a new process.

Remote: with a credential (connect(credential=FILE), or LLMOS_CREDENTIAL=FILE in
the environment) the handle talks to a kernel's TCP endpoint with CurveZMQ
instead (docs/scaling.md): a client's key attaches a new process of the key's
uid; a node's key attaches the program its agent started (with its spawn token).
Tensors then travel in the messages (no /dev/shm across hosts), and a dead kernel
is noticed by the call's timeout only.
"""
from __future__ import annotations

import collections
import itertools
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator

import zmq

from syscalls import (BY_NAME, MAX_HEADER, CredentialError, Errno, Home, SyscallError,
                      check_args, curve_client, decode, encode, read_credential,
                      send_frames, wire)

from ._gpu import gpu_env
from ._hf import ModelMethods
from ._proc import alive, lock_held
from ._stubs import SyscallMethods
from ._tensors import TensorMethods

_POLL_MS = 1000
SIGNAL_NAMES = ("TERM", "KILL", "INT")  # the signals the kernel sends (the table's)


class Llmos(ModelMethods, TensorMethods, SyscallMethods):
    """A handle on llmos, with one method per syscall (see docs/syscalls.md).

    Use it as a context manager: leaving the block ends the process (status 0, or 1
    if the block raised) when it attached from the host; a process the kernel
    spawned ends when its OS process does.
    """

    remote: dict[str, Any] | None = None  # the credential, when over TCP

    def __init__(self, home: str | os.PathLike | None = None, uid: int | None = None,
                 heartbeat: bool = True, timeout: float | None = None,
                 argv: list[str] | None = None, wait: float = 5.0,
                 credential: str | os.PathLike | None = None) -> None:
        self.home = Home.resolve(home)
        self.timeout = timeout
        credential = credential or os.environ.get("LLMOS_CREDENTIAL") or None
        if credential is not None:
            try:
                self.remote = read_credential(credential)
            except CredentialError as e:
                raise SyscallError(Errno.EACCES, str(e)) from None
            self.kernel_pid: int | None = None
        else:
            try:
                self.home.kernel_endpoint  # a home too deep for its socket holds no kernel
            except ValueError as e:
                raise SyscallError(Errno.ENAMETOOLONG, str(e)) from None
            self.kernel_pid = _serving_kernel(self.home, wait)
        self._shm = self.remote is None  # /dev/shm is one host's
        self.ctx = zmq.Context.instance()
        self._seq = itertools.count(1)
        # one call at a time on the socket (a DEALER is not thread-safe, and replies
        # are matched by sequence number): threads sharing a handle take turns
        self._lock = threading.RLock()
        self._streams: dict[int, collections.deque] = {}  # seq -> replies held for it
        self._sock = self._socket()
        self._closed = False
        self._kernel_gone = False
        self._restarted: SyscallError | None = None  # ECONNRESET, once it is known
        self.pid = -1
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        token = os.environ.get("LLMOS_SPAWN_TOKEN")
        if token and uid is None and (self.remote is not None or Home.resolve(
                os.environ.get("LLMOS_HOME")) == self.home):
            os.environ.pop("LLMOS_SPAWN_TOKEN")  # single use: not for our own children
            cred: dict[str, Any] = {"token": token}
        elif self.remote is not None:
            cred = {"uid": uid}  # the key is the credential
        else:
            cred = {"secret": self._read_secret(), "uid": uid}
        self.spawned = "token" in cred
        if self.remote is not None and timeout is None:
            # a refused key never completes its handshake: nothing would ever answer
            self.timeout = max(wait, 1.0)
        try:
            info = self._call(BY_NAME["attach"].number, {
                "os_pid": os.getpid(),
                "argv": (argv if argv is not None else [sys.executable, *sys.argv])[:64],
                "host": os.uname().nodename, "heartbeat": heartbeat, **cred})
        except SyscallError as e:
            self._closed = True
            self._sock.close(0)
            if e.errno == Errno.ETIMEDOUT and self.remote is not None:
                raise SyscallError(Errno.ETIMEDOUT, f"no answer from "
                                   f"{self.remote['endpoint']} in {self.timeout:g} s: is the "
                                   "kernel listening there, and is this key (still) "
                                   "accepted?") from None
            raise
        except BaseException:
            self._closed = True
            self._sock.close(0)
            raise
        self.timeout = timeout
        self.pid: int = info["pid"]
        self.uid: int = info["uid"]
        if self.remote is None:  # a remote kernel's pid names nothing on this host
            self.kernel_pid = info["kernel_pid"]
        if heartbeat:
            self._hb_thread = threading.Thread(target=self._heartbeat, daemon=True,
                                               args=(info["hb_token"], info["heartbeat_s"]),
                                               name="llmos-heartbeat")
            self._hb_thread.start()

    def _socket(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, _POLL_MS)
        if self.remote is not None:
            curve_client(sock, self.remote)
            sock.connect(self.remote["endpoint"])
            return sock
        try:
            endpoint = self.home.kernel_endpoint
        except ValueError as e:
            sock.close(0)
            raise SyscallError(Errno.ENAMETOOLONG, str(e)) from None
        sock.connect(endpoint)
        return sock

    def _read_secret(self) -> str:
        try:
            return self.home.secretfile.read_text().strip()
        except FileNotFoundError:
            raise SyscallError(Errno.ENOENT, f"llmos is not running on {self.home.root} "
                               "(start it with: llmos start)") from None
        except PermissionError:
            raise SyscallError(Errno.EACCES, f"cannot read {self.home.secretfile}") from None

    def _heartbeat(self, token: str, period: float) -> None:
        sock = self._socket()
        try:
            msg = encode(wire.heartbeat(token))
            while True:
                send_frames(sock, msg)
                if self._hb_stop.wait(period):
                    if self.spawned:  # still running, detached: the kernel reaps it
                        send_frames(sock, encode(wire.heartbeat(token, bye=True)))
                    break
        except zmq.ZMQError:
            pass
        finally:
            sock.close(0)

    # -- calls -------------------------------------------------------------------

    def _send(self, seq: int, number: int, args: dict) -> None:
        if self._closed:
            raise SyscallError(Errno.EBADF, "this llmos handle is closed")
        if self._restarted is not None:
            raise self._restarted
        try:
            frames = encode(wire.request(seq, number, args))
        except (TypeError, ValueError, OverflowError) as e:
            raise _unsendable(number, args, e) from None
        if len(frames[0]) > MAX_HEADER:
            raise SyscallError(Errno.E2BIG, f"request header of {len(frames[0])} bytes "
                               f"is over {MAX_HEADER}")
        send_frames(self._sock, frames, block=True)

    def _recv(self, seq: int) -> dict:
        held = self._streams.get(seq)
        if held:  # came while a call made inside this stream's loop waited
            return held.popleft()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                frames = self._sock.recv_multipart()
            except zmq.Again:
                if self.kernel_pid is not None and not alive(self.kernel_pid):
                    self._kernel_gone = True
                    if self._kernel_restarted():
                        raise self._restarted from None  # type: ignore[misc]
                    raise SyscallError(Errno.EIO, "the llmos kernel is gone") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise SyscallError(Errno.ETIMEDOUT, f"no reply from the llmos kernel "
                                       f"in {self.timeout:g} s") from None
                continue
            head = decode(frames)
            got = head.get(wire.SEQ)
            if got == seq:
                if head.get(wire.ERRNO) == Errno.ENOTCONN and self._kernel_restarted():
                    raise self._restarted  # type: ignore[misc]
                return head
            if got in self._streams:  # a stream being read: keep it for it
                self._streams[got].append(head)
            # else: the answer to a call abandoned earlier (e.g. by Ctrl-C); skip it

    def _call(self, number: int, args: dict) -> Any:
        """The final reply's result (partial replies, if any, are skipped)."""
        result = None
        for result in self._stream(number, args):
            pass
        return result

    def _await(self, seq: int, step: Callable[[], Any]) -> Any:
        """step() (sending call seq, or receiving its reply), telling the kernel when
        this process gives up on the call (its timeout, Ctrl-C), so that a parked
        call (wait) does not go on without it."""
        try:
            return step()
        except BaseException as e:
            if not (isinstance(e, SyscallError) and e.errno == Errno.EIO):
                self._cancel(seq)
            raise

    def _kernel_restarted(self) -> bool:
        """Whether another kernel than the one this handle attached to serves the
        home now; if so, remember it: every call from now on is ConnectionLost."""
        if self.remote is not None:
            return False
        now = self.home.kernel_pid()
        if now is None or now == self.kernel_pid:
            return False
        self._restarted = SyscallError(
            Errno.ECONNRESET, f"the llmos kernel restarted (pid {self.kernel_pid} is gone, "
            f"pid {now} runs now): process {self.pid} ended with it; connect again")
        return True

    def _cancel(self, seq: int) -> None:
        try:
            send_frames(self._sock, encode(wire.cancel(seq)))
        except zmq.ZMQError:
            pass

    def _stream(self, number: int, args: dict) -> Iterator[Any]:
        """Partial replies as they come, then the final one. Holds the handle until
        the stream ends or the iterator is closed."""
        with self._lock:
            seq = next(self._seq)
            # replies to it that arrive while the caller makes other calls in its
            # loop (same thread: the lock is reentrant) wait here, not dropped
            self._streams[seq] = collections.deque()
            try:
                # from the send on, giving up on the call (a timeout, Ctrl-C, even one
                # that comes between the send and the wait for the reply) tells the
                # kernel, so that a parked call (wait) does not go on without us; a
                # cancel of a call never sent is nothing to it
                self._await(seq, lambda: self._send(seq, number, args))
                while True:
                    head = self._await(seq, lambda: self._recv(seq))
                    if wire.ERRNO in head:
                        raise SyscallError(head[wire.ERRNO], head.get(wire.MESSAGE, ""))
                    if not head.get(wire.PARTIAL):
                        yield head.get(wire.RESULT)
                        return
                    try:
                        yield head.get(wire.RESULT)
                    except GeneratorExit:  # the caller stopped reading: stop the call
                        self._cancel(seq)
                        raise
            finally:
                self._streams.pop(seq, None)

    def call(self, name: str, **args: Any) -> Any:
        """Make syscall `name` with keyword arguments; the methods wrap this."""
        try:
            number = BY_NAME[name].number
        except KeyError:
            raise SyscallError(Errno.ENOSYS, f"no syscall named {name!r}") from None
        return self._call(number, args)

    # -- calls the library adds to -------------------------------------------------

    def spawn(self, argv: list[str], uid: int | None = None,  # type: ignore[override]
              cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
              gpus: dict | None = None, node: str | None = None) -> int:
        """Start argv (a list: program, then arguments) as a child process, on node
        (None: where the placement setting puts it); cwd defaults to this process's. gpus: an allocation alloc_gpu returned, whose
        environment (gpu_env: CUDA_VISIBLE_DEVICES, the memory bound) the child gets."""
        if not isinstance(argv, (list, tuple)) or not all(
                isinstance(a, (str, os.PathLike)) for a in argv):
            raise SyscallError(Errno.EINVAL, "spawn: argv must be a list of str, "
                               f"not {type(argv).__name__}")
        if gpus is not None:
            env = {**gpu_env(gpus), **(env or {})}
        if cwd is None and self.remote is None:  # this host's directory means nothing
            cwd = os.getcwd()                     # to another
        return super().spawn([os.fspath(a) for a in argv], uid,
                             os.fspath(cwd) if cwd is not None else None, env, node)

    def kill(self, pid: int, signal: str | int = "TERM") -> None:  # type: ignore[override]
        """Send a signal to process pid: "TERM", "KILL" or "INT", or the same as a
        signal.Signals (signal.SIGKILL) or its number; any other is EINVAL."""
        return super().kill(pid, signal_name(signal))

    def spawn_train(self, config: dict[str, Any],  # type: ignore[override]
                    alloc: dict | str | None = None) -> int:
        """Start a training job (docs/executor.md lists the config's keys) as a child
        of this process and return its pid; wait(pid) returns its final loss in info.
        alloc: an allocation of this process (alloc_gpu's result or its id) whose
        GPUs the job trains on; or config["gpus"] = N for the job to allocate N."""
        alloc_id = alloc["id"] if isinstance(alloc, dict) else alloc
        return super().spawn_train(config, alloc_id)

    def exit(self, status: int = 0) -> None:  # type: ignore[override]
        """End this process with status, as exit(3) does: raises SystemExit."""
        super().exit(status)
        self._close()
        raise SystemExit(status)

    # -- lifetime ------------------------------------------------------------------

    def close(self, status: int = 0) -> None:
        """Detach. A host-attached process ends with status; a spawned one ends
        when its OS process does."""
        if self._closed:
            return
        if not self.spawned and not self._kernel_gone:
            try:
                super().exit(status)
            except SyscallError:
                pass
        self._close()

    def _close(self) -> None:
        self._closed = True
        self._drop_staging()
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(2.0)
        self._sock.close(0)

    def __enter__(self) -> "Llmos":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(1 if exc_type is not None and exc_type is not SystemExit else 0)

    def __repr__(self) -> str:
        where = self.remote["endpoint"] if self.remote else self.home.root
        return f"<llmos pid {getattr(self, 'pid', '?')} uid {getattr(self, 'uid', '?')} " \
               f"on {where}>"


def _serving_kernel(home: Home, wait: float) -> int:
    """The pid of the kernel serving home, once it does: a kernel that is starting
    (it holds the home's lock but has not yet written its pid and secret) is waited
    for, up to wait seconds (then EAGAIN); none at all is ENOENT at once."""
    deadline = time.monotonic() + wait
    while True:
        pid = home.kernel_pid()
        if pid is not None and home.secretfile.exists():
            return pid
        if not lock_held(home.lockfile):
            raise SyscallError(Errno.ENOENT, f"llmos is not running on {home.root} "
                               "(start it with: llmos start)")
        if time.monotonic() >= deadline:
            raise SyscallError(Errno.EAGAIN, f"llmos is starting on {home.root} and not "
                               f"ready after {wait:g} s; try again")
        time.sleep(0.05)


def signal_name(sig: str | int) -> str:
    """The name the kernel takes ("TERM") for "TERM", "SIGTERM", "term",
    signal.SIGTERM or 15; EINVAL for a signal llmos does not send."""
    if isinstance(sig, bool):
        raise SyscallError(Errno.EINVAL, f"kill: {sig!r} is not a signal")
    if isinstance(sig, int):
        import signal as signals
        try:
            name = signals.Signals(sig).name
        except ValueError:
            raise SyscallError(Errno.EINVAL, f"kill: {sig} is no signal number") from None
    elif isinstance(sig, str):
        name = sig.upper()
    else:
        raise SyscallError(Errno.EINVAL, f"kill: a signal is a name or a number, not "
                           f"{type(sig).__name__}")
    name = name.removeprefix("SIG")
    if name not in SIGNAL_NAMES:
        raise SyscallError(Errno.EINVAL, f"kill: llmos sends TERM, KILL or INT, not {sig!r}")
    return name


def _unsendable(number: int, args: dict, e: Exception) -> SyscallError:
    """EINVAL for arguments msgpack cannot carry (an int past 64 bits, an object),
    saying which, as the kernel would: the table's own check first."""
    for call in BY_NAME.values():
        if call.number == number:
            try:
                check_args(call, args)
            except SyscallError as checked:
                return checked
            for name, value in args.items():
                items = value.items() if isinstance(value, dict) else [(None, value)]
                for key, v in items:  # a dict argument (a training config): its key
                    try:
                        encode({name: v})
                    except (TypeError, ValueError, OverflowError):
                        where = f"argument {name!r}" + (f", key {key!r}," if key else "")
                        if isinstance(v, int):
                            return SyscallError(Errno.EINVAL, f"{call.name}: {where} is "
                                                f"too large ({len(str(v))} digits)")
                        return SyscallError(Errno.EINVAL, f"{call.name}: {where} "
                                            f"{type(v).__name__} cannot be sent")
    return SyscallError(Errno.EINVAL, f"cannot send these arguments: {e}")


def connect(home: str | os.PathLike | None = None, uid: int | None = None,
            heartbeat: bool = True, timeout: float | None = None,
            argv: list[str] | None = None, wait: float = 5.0,
            credential: str | os.PathLike | None = None) -> Llmos:
    """Attach this Python process to llmos and return its handle.

    home defaults to $LLMOS_HOME, then ~/.llmos. uid (with the home's secret, which
    is an administrator's credential) attaches as that uid instead of the
    configured default_uid. timeout bounds how long each call waits for its reply
    (ETIMEDOUT); by default a call waits as long as the kernel lives. A handle may be
    shared by threads: they take turns. argv is what ps shows when this process
    attaches from the host (default: this interpreter's command line). A kernel
    that is starting is waited for, up to wait seconds (EAGAIN after); none running
    is ENOENT at once, and one that restarted since a handle attached is
    ConnectionLost (ECONNRESET) on that handle's calls. credential (or
    LLMOS_CREDENTIAL): a credential file, to attach over TCP instead (see above).
    """
    return Llmos(home, uid, heartbeat, timeout, argv, wait, credential)
