"""The rough edges a new user hit (issue 11), each pinned by a test that failed on
the code before it: a shell that outlived its kernel, buffered output, float64,
signal.SIGKILL, member paths, ps's system processes and long commands, pids
reused across boots, finished jobs forgotten, logs nobody could find, raw numbers
in errors. Each runs the real `llmos` command (or the library) against a real
kernel on a temporary home."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from conftest import wait_until
from test_cli import CliHome, cli_home, started  # noqa: F401 (fixtures)

import userland
from syscalls import Errno


@pytest.fixture
def h(started: CliHome) -> CliHome:
    """A kernel started with `llmos start`, shared by the module's tests."""
    return started


@pytest.fixture
def own(cli_home: CliHome) -> CliHome:
    """A kernel of the test's own, for tests that stop or restart it."""
    cli_home.start()
    return cli_home


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def connect(h: CliHome, **kw: Any) -> userland.Llmos:
    return userland.connect(h.root, **kw)


# -- the kernel restarts under a shell ------------------------------------------------

def restart(h: CliHome) -> int:
    """SIGKILL the kernel (its processes die with it) and start a new one; its pid."""
    old = h.home.kernel_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: h.home.kernel_pid() is None
                      or h.home.kernel_pid() != old, 10)
    return h.start()


def test_a_handle_whose_kernel_restarted_says_so(own: CliHome) -> None:
    osh = connect(own)
    try:
        restart(own)
        with pytest.raises(userland.ConnectionLost) as e:
            osh.getpid()
        assert e.value.errno == Errno.ECONNRESET
        assert "the llmos kernel restarted" in e.value.message
        with pytest.raises(userland.ConnectionLost):  # and stays so: not "call attach"
            osh.ps()
    finally:
        osh._close()


def test_the_shell_attaches_again_after_a_kernel_restart(own: CliHome) -> None:
    shell = own.popen("shell", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    assert shell.stdin is not None and shell.stdout is not None and shell.stderr is not None
    shell.stdin.write("syscall getpid\n")
    shell.stdin.flush()
    first = int(shell.stdout.readline())
    new_kernel = restart(own)
    shell.stdin.write("syscall getpid\nps\nexit\n")
    shell.stdin.flush()
    out, err = shell.communicate(timeout=60)
    lines = err.splitlines()
    assert len(lines) == 1, err  # one line says it, and nothing failed
    assert lines[0].startswith("llmos: the kernel restarted") and f"-> {new_kernel}" in lines[0]
    second = int(out.splitlines()[0])
    assert second > first  # a new process (pids are never reused on a home)
    assert "llmos shell" in out and shell.returncode == 0


# -- programs -----------------------------------------------------------------------------

def test_a_spawned_python_program_prints_as_it_runs(h: CliHome) -> None:
    with connect(h) as osh:
        pid = osh.spawn(["python", "-c", "import time; print('a'); time.sleep(5); "
                                         "print('b')"])
        log = h.home.proc_log(pid)
        assert wait_until(lambda: log.exists() and "a" in log.read_text(), 30)
        assert "b" not in log.read_text()  # 'a' came before the program ended
        assert osh.wait(pid)["status"] == 0


def test_kill_takes_signal_module_names_and_numbers(h: CliHome) -> None:
    with connect(h) as osh:
        for sig, signum in ((signal.SIGKILL, 9), (signal.SIGTERM, 15), (2, 2),
                            ("SIGKILL", 9), ("kill", 9)):
            pid = osh.spawn(["python", "-c", "import time; time.sleep(60)"])
            osh.kill(pid, sig)
            assert osh.wait(pid, timeout=30)["status"] == -signum, sig
        with pytest.raises(userland.InvalidArgument) as e:
            osh.kill(pid, signal.SIGSTOP)
        assert "TERM, KILL or INT" in e.value.message
    r = h.llmos("kill", "-s", "9", "99999")
    assert r.returncode == 1 and "ESRCH" in r.stderr


# -- tensors ------------------------------------------------------------------------------

def test_float64_is_refused_clearly_and_dtype_casts(h: CliHome, tmp_path: Any) -> None:
    data = np.random.default_rng(0).standard_normal(5)  # numpy's float64
    with connect(h) as osh:
        with pytest.raises(userland.InvalidArgument) as e:
            osh.save_tensor("/f64", data)
        assert "float64" in e.value.message and "dtype=" in e.value.message
        osh.save_tensor("/f64", data, dtype="float32")
        assert osh.stat("/f64")["dtype"] == "float32"
        assert np.allclose(osh.load_array("/f64"), data.astype(np.float32))
    np.save(tmp_path / "f64.npy", data)
    r = h.llmos("put", str(tmp_path / "f64.npy"), "/f64cli")
    assert r.returncode == 1 and "--dtype float32" in r.stderr, r.stderr
    ok(h.llmos("put", "-q", "--dtype", "float16", str(tmp_path / "f64.npy"), "/f64cli"))
    assert json.loads(ok(h.llmos("stat", "--json", "/f64cli")))[0]["dtype"] == "float16"


def test_a_member_is_named_path_name_everywhere(h: CliHome, tmp_path: Any) -> None:
    with connect(h) as osh:
        osh.save_tensors("/grp", {"ln_f.bias": np.arange(4, dtype=np.float32),
                                  "w": np.ones((2, 2), np.int8)})
        assert osh.load_tensor("/grp[ln_f.bias]").tolist() == [0, 1, 2, 3]
        assert osh.stat("/grp[w]")["shape"] == [2, 2]
    out = ok(h.llmos("cat", "/grp[ln_f.bias]"))
    assert out.startswith("/grp[ln_f.bias]\n") and "values  [0, 1, 2, 3]" in out
    ok(h.llmos("get", "-q", "/grp[w]", str(tmp_path / "w.npy")))
    assert np.load(tmp_path / "w.npy").tolist() == [[1, 1], [1, 1]]
    r = h.llmos("stat", "/grp[nope]")
    assert r.returncode == 1 and "ENOENT" in r.stderr


# -- processes ----------------------------------------------------------------------------

def test_ps_marks_system_processes_and_shows_short_commands(h: CliHome) -> None:
    with connect(h) as osh:
        with pytest.raises(userland.NotFound):  # the executor looks as this uid: a
            osh.infer("/models/none", "x")    # connection of its own, a system process
        procs = {p["pid"]: p for p in osh.ps()}
        system = [p for p in procs.values() if p["system"]]
        assert system and all(p["argv"][0] == "executor" for p in system)
        with pytest.raises(userland.PermissionDenied) as e:
            osh.kill(system[0]["pid"])
        assert "system process" in e.value.message
    pid = int(ok(h.llmos("run", "-d", sys.executable, "-c", "import time; time.sleep(60)")))
    try:
        out = ok(h.llmos("ps"))
        assert f"[executor (as uid {osh.uid})]" in out
        assert " llmos ps\n" in out and sys.executable not in out  # not the venv's path
        assert " python -c import time; time.sleep(60)\n" in out
        assert f" {sys.executable} -c import time" in ok(h.llmos("ps", "-f"))  # as it is
    finally:
        h.llmos("kill", "-s", "KILL", str(pid))


def test_pids_are_never_reused_across_boots(own: CliHome) -> None:
    with connect(own) as osh:
        pid = osh.spawn(["python", "-c", "print('first boot')"])
        osh.wait(pid)
    ok(own.llmos("stop"))
    own.start()
    with connect(own) as osh:
        later = osh.spawn(["python", "-c", "print('second boot')"])
        osh.wait(later)
    assert later > pid
    assert own.home.proc_log(pid).read_text() == "first boot\n"  # not overwritten
    assert ok(own.llmos("logs", str(later))) == "second boot\n"


def test_jobs_keeps_the_ones_that_ended(h: CliHome) -> None:
    report = ("import userland\n"
              "with userland.connect() as o:\n"
              "    o.report({'state': 'done', 'step': 3, 'steps': 3, 'loss': 1.25, "
              "'checkpoint': '/models/x/step-000003'})")
    r = h.llmos("run", "-d", "python", "-c", report)
    pid = int(ok(r))
    assert wait_until(lambda: f"\n{pid:>5}" not in h.llmos("ps").stdout, 30)
    assert f"{pid}" not in ok(h.llmos("jobs"))
    ended = {j["pid"]: j for j in json.loads(ok(h.llmos("jobs", "-a", "--json")))}
    assert ended[pid]["state"] == "ended" and ended[pid]["status"] == 0
    assert ended[pid]["info"]["loss"] == 1.25
    line = next(ln for ln in ok(h.llmos("jobs", "-a")).splitlines()
                if ln.split()[0] == str(pid))
    assert "exited 0" in line and "done  step 3/3" in line and "loss 1.250" in line


def test_logs_of_a_pid_the_kernel_and_a_driver_and_follow(h: CliHome) -> None:
    pid = int(ok(h.llmos("run", "-d", "python", "-c",
                         "import time\nfor i in range(3): print('tick', i); time.sleep(1)")))
    followed = h.llmos("logs", "-f", str(pid))  # until the process ends
    assert followed.stdout == "tick 0\ntick 1\ntick 2\n", followed
    assert "llmos kernel" in ok(h.llmos("logs", "kernel"))
    assert ok(h.llmos("logs", "-n", "1", "tensorfs")).count("\n") == 1
    r = h.llmos("logs", "nosuch")
    assert r.returncode == 1 and "ENOENT" in r.stderr and "tensorfs" in r.stderr


# -- errors a person reads -----------------------------------------------------------------

def test_errors_say_sizes_and_bounds_as_people_write_them(h: CliHome) -> None:
    r = h.llmos("alloc", "1TiB")
    assert r.returncode == 1 and "1 TiB can never be met" in r.stderr \
        and "the largest of 16 GiB" in r.stderr, r.stderr
    r = h.llmos("alloc", "999999999999999999999999")
    assert r.returncode == 1 and "too large" in r.stderr and "cannot encode" not in r.stderr
    with connect(h) as osh:
        with pytest.raises(userland.InvalidArgument) as e:
            osh.alloc_gpu(10**30)
        assert "too large" in e.value.message
        with pytest.raises(userland.InvalidArgument) as e:
            osh.wait(timeout=-1)
        assert "must be between 0 and 31536000, got -1" in e.value.message


def test_a_command_usage_error_shows_that_commands_usage(h: CliHome) -> None:
    r = h.llmos("ps", "-x")
    assert r.returncode == 2
    assert r.stderr.startswith("usage: llmos ps ") and "unrecognized arguments: -x" in r.stderr
    assert "COMMAND [ARGS...]" not in r.stderr  # not the top-level usage


def test_the_error_families_catch_by_kind(h: CliHome) -> None:
    with connect(h) as osh:
        with pytest.raises(userland.NotFound):
            osh.stat("/nope")
        with pytest.raises(userland.NotFound):
            osh.kill(99999)
        try:
            osh.mkdir("/fam")
            osh.mkdir("/fam")
        except userland.AlreadyExists as e:
            assert e.errno == Errno.EEXIST and isinstance(e, userland.SyscallError)
        else:
            raise AssertionError("EEXIST expected")


def test_completion_scripts_come_from_the_table(h: CliHome) -> None:
    bash = ok(h.llmos("completion", "bash"))
    assert "complete -o nospace -o default -F _llmos llmos" in bash
    assert "compdef _llmos llmos" in ok(h.llmos("completion", "zsh"))
    assert ok(h.llmos("__complete", "1", "llmos", "sysi")) == "sysinfo \n"
    ok(h.llmos("mkdir", "-p", "/compl/dir"))
    assert ok(h.llmos("__complete", "2", "llmos", "ls", "/compl/d")) == "/compl/dir/\n"
    assert "--signal " in ok(h.llmos("__complete", "2", "llmos", "kill", "--s"))


@pytest.mark.slow
def test_ctrl_c_on_train_keeps_a_checkpoint_and_resume_goes_on(h: CliHome) -> None:
    ok(h.llmos("corpus", "/datasets/nu", "--max-bytes", "256KiB"))
    argv = ("train", "nu", "--data", "/datasets/nu", "--steps", "100000", "--workers", "1",
            "--layers", "1", "--heads", "2", "--width", "32", "--context", "32",
            "--checkpoint-every", "0", "log_every=1")
    proc = h.popen(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    while True:  # until it has made some steps
        line = proc.stdout.readline()
        assert line, "train ended early"
        if "running  step" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "stopping the job: it writes a checkpoint" in err
    assert "stopped  step" in out and "checkpoint: /models/nu/step-" in out, out
    hint = f"resume with: llmos {shlex.join(argv)} --resume"  # the same model
    assert hint in out, out
    step = int(out.split("checkpoint: /models/nu/step-")[1].split()[0])
    assert step > 0
    resumed = json.loads(ok(h.llmos(*shlex.split(hint)[3:], "--json",
                                    "steps=" + str(step + 2))))
    assert resumed["status"] == 0 and resumed["info"]["step"] == step + 2


# -- what a fresh-eyes review found ---------------------------------------------------------

def test_rm_r_refuses_the_root_and_goes_on_after_a_failure(h: CliHome) -> None:
    r = h.llmos("rm", "-r", "/")
    assert r.returncode == 1 and "refusing to remove /" in r.stderr
    ok(h.llmos("mkdir", "-p", "/keep/b"))
    with connect(h, uid=0) as root:  # a directory of root's in it: what it holds,
        root.mkdir("/keep/a", 0o755)   # uid 1000 may not remove
        root.save_tensor("/keep/a/x", np.zeros(1, np.int8))
    r = h.llmos("rm", "-r", "/keep")
    assert r.returncode == 1 and "EACCES" in r.stderr
    left = {e["name"] for e in json.loads(ok(h.llmos("ls", "--json", "/keep")))["/keep"]}
    assert left == {"a"}  # b went, as rm -r goes on; a holds what could not go


def test_get_of_bfloat16_to_npy_writes_floats_and_put_dtype_leaves_integers(
        h: CliHome, tmp_path: Any) -> None:
    import torch
    with connect(h) as osh:
        osh.save_tensor("/bf", torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    r = h.llmos("get", "/bf", str(tmp_path / "bf.npy"))
    assert r.returncode == 0 and "as float32" in r.stderr, r.stderr
    assert np.load(tmp_path / "bf.npy").tolist() == [1.5, -2.0]
    from safetensors.numpy import save_file
    save_file({"w": np.ones(2), "n": np.arange(2)}, tmp_path / "mixed.safetensors")
    ok(h.llmos("put", "-q", "-g", "--dtype", "float32", str(tmp_path / "mixed.safetensors"),
               "/mixed"))
    members = {m["name"]: m["dtype"] for m in
               json.loads(ok(h.llmos("stat", "--json", "/mixed")))[0]["members"]}
    assert members == {"w": "float32", "n": "int64"}


def test_put_into_a_directory_names_the_tensor_after_the_file(h: CliHome,
                                                               tmp_path: Any) -> None:
    np.save(tmp_path / "weights.npy", np.arange(3, dtype=np.int32))
    ok(h.llmos("mkdir", "/into"))
    ok(h.llmos("put", "-q", str(tmp_path / "weights.npy"), "/into"))
    assert ok(h.llmos("ls", "/into")) == "weights\n"


def test_one_sided_commands_say_where_they_are(h: CliHome) -> None:
    r = h.llmos("cd", "/")
    assert r.returncode == 2 and "a command of the shell only" in r.stderr
    r = h.llmos("shell", "-c", "stop")
    assert r.returncode == 1 and "a command of the llmos command" in r.stderr


def test_bad_numbers_read_as_people_write_them(h: CliHome) -> None:
    r = h.llmos("--uid", "-1", "ps")
    assert r.returncode == 2 and "a uid from 0 to 2147483647" in r.stderr
    r = h.llmos("syscall", "sleep", "seconds=1e308")
    assert r.returncode == 1 and "1e+308" in r.stderr and "0" * 30 not in r.stderr
    ok(h.llmos("corpus", "/datasets/tiny", "--max-bytes", "1KiB"))
    r = h.llmos("train", "x", "--data", "/datasets/tiny", "--steps", "9" * 20)
    assert r.returncode == 1 and "key 'steps'" in r.stderr and "too large" in r.stderr


def test_alloc_json_with_a_program_prints_the_allocation_first(h: CliHome) -> None:
    r = h.llmos("alloc", "1MiB", "--json", "--", "python", "-c", "print('ran')")
    assert r.returncode == 0, r.stderr
    record, rest = r.stdout.split("}\n", 1)
    assert json.loads(record + "}")["bytes_each"] == 1 << 20 and rest == "ran\n"


def test_corpus_takes_a_directory(h: CliHome, tmp_path: Any) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha ")
    (tmp_path / "sub" / "b.txt").write_text("beta")
    ok(h.llmos("corpus", "/datasets/dir", str(tmp_path)))
    with connect(h) as osh:
        assert bytes(osh.load_array("/datasets/dir")) == b"alpha beta"


def test_a_call_given_up_right_after_its_send_is_cancelled(h: CliHome, monkeypatch) -> None:
    """Ctrl-C can land between a request's send and the wait for its reply: the
    kernel must still hear that the caller gave up, or a parked wait would reap a
    child nobody hears of (CI once lost a training job's status so)."""
    import syscalls.client._client as client
    with connect(h) as osh:
        child = osh.spawn(["python", "-c", "import time; time.sleep(60)"])
        sent = client.send_frames

        def send_then_interrupt(*args: Any, **kw: Any) -> None:
            sent(*args, **kw)
            raise KeyboardInterrupt  # as a signal arriving just after the send

        monkeypatch.setattr(client, "send_frames", send_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            osh.wait(child)
        monkeypatch.undo()
        assert wait_until(lambda: osh.sysinfo()["waiting"] == 0, 10)  # not parked
        osh.kill(child, "KILL")
        assert osh.wait(child, timeout=30)["status"] == -9  # its status is still ours
