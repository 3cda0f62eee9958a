"""echo, ticks and sleep: the echo driver's syscalls against their contracts.

Model: the echo driver keeps no state; each call's answer follows from its
arguments alone (echo: the same bytes; ticks: 0..count-1 as partial replies, then
count; sleep: at least the seconds asked). A stream abandoned part-way must not
leave a stray reply behind: the next call on the handle gets its own answer."""
from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from conftest import Booted, wait_until
from syscalls import Errno

from ._util import FAST, LONG, WAIT_S, expect

BAD_ARGS = [
    ("echo", {}), ("echo", {"data": "text"}), ("echo", {"data": None}),
    ("echo", {"data": b"", "extra": 1}),
    ("ticks", {"count": 0}), ("ticks", {"count": 10001}), ("ticks", {"count": 1.5}),
    ("ticks", {"count": 1, "interval": -0.1}), ("ticks", {"count": 1, "interval": 11}),
    ("ticks", {"count": True}),
    ("sleep", {}), ("sleep", {"seconds": -1}), ("sleep", {"seconds": 3601}),
    ("sleep", {"seconds": float("nan")}), ("sleep", {"seconds": "1"}),
]


def _echo_inflight(osh) -> int:
    return next(d["inflight"] + d["backlog"] for d in osh.sysinfo()["drivers"]
                if d["name"] == "echo")


class EchoMachine(RuleBasedStateMachine):
    system: Booted

    def __init__(self) -> None:
        super().__init__()
        self.osh = self.system.connect()

    def teardown(self) -> None:
        self.osh.close()

    @rule(data=st.binary(max_size=2048) | st.sampled_from([b"", b"\x00" * 70_000]))
    def echo(self, data: bytes) -> None:
        assert self.osh.echo(data) == data

    @rule(count=st.integers(1, 25), interval=st.sampled_from([0.0, 0.001]))
    def ticks(self, count: int, interval: float) -> None:
        assert list(self.osh.ticks(count, interval)) == [*range(count), count]

    @rule(count=st.integers(2, 25), keep=st.integers(0, 3))
    def ticks_abandoned(self, count: int, keep: int) -> None:
        it = self.osh.ticks(count, 0.001)
        got = [next(it) for _ in range(min(keep, count))]
        it.close()  # the library cancels; what the driver still sends is dropped
        assert got == list(range(len(got)))
        # the echo driver has no cancel hook: the stream runs to its end, and counts
        # against max_inflight_per_process until then (test_targeted shows the EAGAIN)
        assert wait_until(lambda: _echo_inflight(self.osh) == 0, WAIT_S)
        assert self.osh.echo(b"after") == b"after"

    @rule(seconds=st.sampled_from([0.0, 0.001, 0.02]))
    def sleep(self, seconds: float) -> None:
        slept = self.osh.sleep(seconds)
        assert type(slept) is float and slept >= seconds - 1e-6, slept

    @rule(bad=st.sampled_from(BAD_ARGS))
    def bad_arguments(self, bad: tuple[str, dict]) -> None:
        name, args = bad
        expect(Errno.EINVAL, self.osh.call, name, **args)


def _run(system: Booted, cfg) -> None:
    EchoMachine.system = system
    run_state_machine_as_test(EchoMachine, settings=cfg)


def test_echo_machine(system: Booted) -> None:
    _run(system, FAST)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_echo_machine_long(system: Booted) -> None:
    _run(system, LONG)
