def test_attach_and_getpid(shared_kernel):
    with shared_kernel.connect() as osh:
        assert osh.getpid() == osh.pid
        assert osh.uid == 1000
        pids = [p["pid"] for p in osh.ps()]
        assert 1 in pids and osh.pid in pids
