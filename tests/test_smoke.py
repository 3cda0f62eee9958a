def test_attach_and_getpid(shared_kernel):
    with shared_kernel.connect() as osh:
        assert osh.getpid() == osh.pid
        assert osh.uid == 1000
        pids = [p["pid"] for p in osh.ps()]
        assert 1 in pids and osh.pid in pids


def test_the_example_program_runs_inside_llmos(shared_kernel):
    """userland/examples/hello.py, which `make demo` runs, works end to end."""
    from conftest import ROOT
    with shared_kernel.connect() as osh:
        pid = osh.spawn(["python", str(ROOT / "userland" / "examples" / "hello.py")])
        assert osh.wait(pid, timeout=60)["status"] == 0
    out = (shared_kernel.root / "log" / "proc" / f"{pid}.log").read_text()
    for line in ("wait -> {'pid'", "b'hello, driver'", "simulated: True",
                 "load_tensor(", "[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]", "ECHILD: wait"):
        assert line in out, out
