"""The kernel survives and answers every kind of bad input, over real sockets.

A raw zmq client (tests/rawclient.py) sends what userland never would: garbage
frames, wrong ABI versions, unknown syscalls, requests before attach, wrongly
typed arguments for every kernel syscall in the table, oversized headers, a
flood, and junk on the drivers' socket. Undecodable messages must be dropped and
counted; decodable-but-bad ones must get the right errno. After each case a
well-behaved userland client must still be served, and at the end the kernel
must be the same live process that booted, with no internal errors counted.
"""
from __future__ import annotations

import math
import os
import random
import threading
import time
from typing import Any

import msgpack
import psutil
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

import userland
from conftest import Booted, examples, wait_until
from rawclient import NO_ARGS, RawClient
from syscalls import (ABI_VERSION, BY_NAME, MAX_HEADER, TABLE, Arg, Errno, Syscall, WireError,
                      decode, encode)

NOP = BY_NAME["nop"].number
GETPID = BY_NAME["getpid"].number
KERNEL_CALLS = [s for s in TABLE if s.service == "kernel"]
NO_SUCH_PROGRAM = "/nonexistent/llmos-test-no-such-program"
NO_SUCH_PID = 2**31 - 1  # within kill's bounds, never a live llmos pid here
MSGPACK_MAX_DEPTH = 1024  # msgpack's unpacker refuses deeper nesting


def safe_args(call: Syscall) -> dict[str, Any]:
    """Valid arguments that do no harm should a kernel bug let a call through:
    spawn names no program, kill no process, wait finds no child, node_ctl no node."""
    return {"attach": {"os_pid": os.getpid(), "secret": "not-the-secret"},
            "spawn": {"argv": [NO_SUCH_PROGRAM]},
            "kill": {"pid": NO_SUCH_PID, "signal": "TERM"},
            "exit": {"status": 0},
            "echo": {"data": b"x"},
            "ticks": {"count": 1},
            "sleep": {"seconds": 0},
            "report": {"info": {}},
            "node_ctl": {"name": "no-such-node", "action": "drain"}}.get(call.name, {})


def deep_list(depth: int) -> bytes:
    """msgpack bytes of [[[...1...]]] nested depth times (packb refuses this deep)."""
    return b"\x91" * depth + b"\x01"


def header_bytes(**fields: bytes) -> bytes:
    """A msgpack map of already-packed values, for values packb cannot make."""
    out = bytes([0x80 | len(fields)])
    for key, packed in fields.items():
        out += msgpack.packb(key) + packed
    return out


# -- fixtures and checks ---------------------------------------------------------


@pytest.fixture(scope="module")
def kernel(shared_kernel: Booted) -> Booted:
    return shared_kernel


@pytest.fixture(scope="module")
def raw(kernel: Booted):
    """A raw client attached as a process of uid 1000."""
    with RawClient(kernel.home.kernel_endpoint) as client:
        reply = client.attach(kernel.home)
        assert "r" in reply, reply
        yield client


@pytest.fixture
def fresh(kernel: Booted):
    """A raw client that has not attached."""
    with RawClient(kernel.home.kernel_endpoint) as client:
        yield client


def well_behaved(kernel: Booted) -> userland.Llmos:
    """A userland client without the heartbeat thread: a heartbeat that lands after
    its process exits is counted as a stale_heartbeat drop, which would race with
    the tests that count exactly those."""
    return kernel.connect(heartbeat=False)


def dropped(kernel: Booted) -> dict[str, int]:
    with well_behaved(kernel) as osh:
        return osh.sysinfo()["dropped"]


def assert_still_serving(kernel: Booted) -> None:
    """A well-behaved client attaches and is answered; the kernel is the one we booted."""
    assert kernel.home.kernel_pid() == kernel.pid
    with well_behaved(kernel) as osh:
        assert osh.nop() is None
        assert osh.getpid() == osh.pid


def assert_error(reply: dict, errno: Errno, *words: str) -> None:
    assert reply.get("e") == errno, f"expected {errno.name}, got {reply}"
    for word in words:
        assert word in reply["m"], f"{word!r} not in {reply['m']!r}"


def assert_dropped(kernel: Booted, client: RawClient, frames: list[bytes], counter: str) -> None:
    """frames get no reply, are counted under `counter`, and the connection still works:
    the next request's reply is the first thing back (one peer's messages stay in order)."""
    before = dropped(kernel).get(counter, 0)
    client.send(frames)
    seq = client.request(NOP)
    reply = client.recv()
    assert reply.get("s") == seq, f"a dropped message was answered: {reply}"
    assert dropped(kernel).get(counter, 0) == before + 1


# -- messages that cannot be answered: dropped and counted ---------------------------

VALID = msgpack.packb({"v": ABI_VERSION, "s": 7, "n": NOP, "a": {}})


def _random_garbage(seed: int, size: int) -> bytes:
    """Deterministic random bytes that syscalls.decode rejects (checked here, so the
    case cannot silently become a valid message)."""
    rnd = random.Random(seed)
    while True:
        data = rnd.randbytes(size)
        try:
            decode([data])
        except WireError:
            return data


GARBAGE = {
    "random_bytes": ([_random_garbage(1, 64)], "malformed"),
    "random_long": ([_random_garbage(2, 65536)], "malformed"),
    "empty_frame": ([b""], "malformed"),
    "many_frames": ([_random_garbage(3, 16)] + [b"x"] * 1000, "malformed"),
    "many_empty_frames": ([b""] * 100, "malformed"),
    "truncated_msgpack": ([VALID[:len(VALID) // 2]], "malformed"),
    "trailing_bytes": ([VALID + b"\xc0"], "malformed"),
    "list_not_map": ([msgpack.packb([ABI_VERSION, 7, NOP])], "malformed"),
    "int_not_map": ([msgpack.packb(7)], "malformed"),
    "str_not_map": ([msgpack.packb("nop")], "malformed"),
    "nil_not_map": ([msgpack.packb(None)], "malformed"),
    "bin_not_map": ([msgpack.packb(b"\x81\xa1s\x07")], "malformed"),
    "int_map_key": ([msgpack.packb({1: 2, "s": 7})], "malformed"),
    "invalid_utf8": ([header_bytes(v=msgpack.packb(1), s=msgpack.packb(7), n=b"\xa2\xff\xfe")],
                     "malformed"),
    "too_deep": ([header_bytes(s=msgpack.packb(7), n=deep_list(MSGPACK_MAX_DEPTH + 1))],
                 "malformed"),
    "frame_ref_missing": ([msgpack.packb({"v": ABI_VERSION, "s": 7, "n": 100, "a": {
        "data": msgpack.ExtType(1, (1).to_bytes(4, "little"))}}), b"only frame 0"], "malformed"),
    "frame_ref_no_frames": ([msgpack.packb({"v": ABI_VERSION, "s": 7, "n": 1, "a": {
        "x": msgpack.ExtType(1, (0).to_bytes(4, "little"))}})], "malformed"),
    "frame_ref_short": ([msgpack.packb({"v": ABI_VERSION, "s": 7, "n": 1, "a": {
        "x": msgpack.ExtType(1, b"\x00\x00")}}), b"frame"], "malformed"),
    "unknown_ext_type": ([msgpack.packb({"v": ABI_VERSION, "s": 7, "n": 1, "a": {
        "x": msgpack.ExtType(42, b"\x00\x00\x00\x00")}}), b"frame"], "malformed"),
    "no_seq": ([msgpack.packb({"v": ABI_VERSION, "n": NOP, "a": {}})], "no_sequence"),
    "str_seq": ([msgpack.packb({"v": ABI_VERSION, "s": "7", "n": NOP})], "no_sequence"),
    "bool_seq": ([msgpack.packb({"v": ABI_VERSION, "s": True, "n": NOP})], "no_sequence"),
    "float_seq": ([msgpack.packb({"v": ABI_VERSION, "s": 7.0, "n": NOP})], "no_sequence"),
    "empty_map": ([msgpack.packb({})], "no_sequence"),
    "stale_heartbeat": ([msgpack.packb({"t": "hb", "k": "no-such-token"})], "stale_heartbeat"),
    "heartbeat_bad_token": ([msgpack.packb({"t": "hb", "k": [1, 2]})], "stale_heartbeat"),
}


@pytest.mark.parametrize("case", GARBAGE)
def test_unanswerable_is_dropped_and_counted(kernel: Booted, raw: RawClient, case: str) -> None:
    frames, counter = GARBAGE[case]
    assert_dropped(kernel, raw, frames, counter)
    assert_still_serving(kernel)


def test_undecodable_before_attach_is_dropped(kernel: Booted, fresh: RawClient) -> None:
    before = dropped(kernel).get("malformed", 0)
    fresh.send([b"\xc1garbage"])
    seq = fresh.request(NOP)
    reply = fresh.recv()
    assert reply["s"] == seq
    assert_error(reply, Errno.ENOTCONN, "attached")
    assert dropped(kernel).get("malformed", 0) == before + 1
    assert_still_serving(kernel)


def test_header_over_max_header_is_dropped(kernel: Booted, raw: RawClient) -> None:
    def padded(size: int) -> bytes:
        """A nop request carrying an unknown argument that makes the header `size` bytes."""
        head = msgpack.packb({"v": ABI_VERSION, "s": 77, "n": NOP, "a": {"pad": ""}})
        pad = "x" * (size - len(head) - 4)  # str8 -> str32 header grows by 4 bytes
        out = msgpack.packb({"v": ABI_VERSION, "s": 77, "n": NOP, "a": {"pad": pad}})
        assert len(out) == size
        return out

    assert_dropped(kernel, raw, [padded(MAX_HEADER + 1)], "malformed")
    # the same request at exactly the limit is read and answered (EINVAL: unknown 'pad')
    raw.send([padded(MAX_HEADER)])
    assert_error(raw.reply_to(77), Errno.EINVAL, "'pad'")
    assert_still_serving(kernel)


# -- decodable but wrong: an errno reply -------------------------------------------


@pytest.mark.parametrize("version", [ABI_VERSION + 1, 0, -1, 2**32, "1", 1.5, None, [1],
                                     {"abi": 1}, float(ABI_VERSION), True])
def test_wrong_abi_version_is_eproto(kernel: Booted, raw: RawClient, version: Any) -> None:
    reply = raw.call(NOP, v=version)
    assert_error(reply, Errno.EPROTO, f"client speaks {version!r}",
                 f"kernel speaks {ABI_VERSION}")
    assert_still_serving(kernel)


def test_missing_abi_version_is_eproto(kernel: Booted, fresh: RawClient) -> None:
    fresh.send([msgpack.packb({"s": 5, "n": NOP})])
    assert_error(fresh.reply_to(5), Errno.EPROTO, "None", f"kernel speaks {ABI_VERSION}")
    assert_still_serving(kernel)


@pytest.mark.parametrize("field", ["v", "n"])
def test_deeply_nested_field_is_answered(kernel: Booted, raw: RawClient, field: str) -> None:
    """A value as deep as msgpack allows still gets its errno reply (the kernel quotes
    it in the message, which must not overflow the stack)."""
    fields = {"v": msgpack.packb(ABI_VERSION), "s": msgpack.packb(11), "n": msgpack.packb(NOP)}
    fields[field] = deep_list(MSGPACK_MAX_DEPTH - 1)  # the header map is one level
    raw.send([header_bytes(**fields)])
    reply = raw.reply_to(11)
    assert_error(reply, Errno.EPROTO if field == "v" else Errno.ENOSYS)
    assert_still_serving(kernel)


@pytest.mark.parametrize("number", [9999, -1, 13, 99, 199, 499, 2**63, -2**63, "1", "nop", 1.0,
                                    None, True, [1], {"n": 1}, b"\x01"])
def test_unknown_syscall_is_enosys(kernel: Booted, raw: RawClient, number: Any) -> None:
    before = dropped(kernel).get("unknown_syscall", 0)
    reply = raw.call(number)
    assert_error(reply, Errno.ENOSYS, "no syscall number")
    assert dropped(kernel).get("unknown_syscall", 0) == before + 1
    assert_still_serving(kernel)


def test_missing_syscall_number_is_enosys(kernel: Booted, raw: RawClient) -> None:
    raw.send([msgpack.packb({"v": ABI_VERSION, "s": 9})])
    assert_error(raw.reply_to(9), Errno.ENOSYS, "None")
    assert_still_serving(kernel)


def test_surplus_frames_are_ignored(kernel: Booted, raw: RawClient) -> None:
    """Frames no argument refers to do not upset a kernel call."""
    raw.send([msgpack.packb({"v": ABI_VERSION, "s": 12, "n": GETPID}), *[b"junk"] * 500])
    reply = raw.reply_to(12)
    assert type(reply.get("r")) is int, reply
    assert_still_serving(kernel)


# -- attach ----------------------------------------------------------------------


@pytest.mark.parametrize("call", [s for s in TABLE if s.name != "attach"], ids=lambda s: s.name)
def test_every_call_before_attach_is_enotconn(kernel: Booted, fresh: RawClient,
                                           call: Syscall) -> None:
    assert_error(fresh.call(call.number, safe_args(call)), Errno.ENOTCONN, "attached")
    assert_still_serving(kernel)


def test_attach_twice_is_ebusy(kernel: Booted, fresh: RawClient) -> None:
    first = fresh.attach(kernel.home)
    pid = first["r"]["pid"]
    assert_error(fresh.attach(kernel.home), Errno.EBUSY, str(pid))
    # still the same process
    assert fresh.call(GETPID)["r"] == pid
    assert_still_serving(kernel)


@pytest.mark.parametrize("creds", [
    {"secret": "0" * 64},
    {"secret": ""},
    {"secret": "\u00e9t\u00e9 \u263a"},  # non-ASCII
    {"secret": None},
    {"secret": None, "token": None},
    {"token": "no-such-token"},
    {"token": ""},
    {"token": "\u263a"},
], ids=["wrong_secret", "empty_secret", "non_ascii_secret", "no_secret", "neither",
        "bad_token", "empty_token", "non_ascii_token"])
def test_bad_credentials_are_eacces(kernel: Booted, fresh: RawClient, creds: dict) -> None:
    assert_error(fresh.attach(kernel.home, **creds), Errno.EACCES)
    # the connection stays unattached, and can still attach properly
    assert_error(fresh.call(NOP), Errno.ENOTCONN)
    assert "r" in fresh.attach(kernel.home)
    reply = fresh.call(NOP)
    assert "e" not in reply and reply["r"] is None, reply
    assert_still_serving(kernel)


# -- arguments checked against the table -------------------------------------------


def _too_long(arg: Arg) -> Any:
    n = arg.max_len + 1
    if arg.type == "str":
        return "x" * n
    if arg.type == "list[str]":
        return ["x"] * n
    return {f"k{i}": "v" for i in range(n)}


WRONG_TYPE: dict[str, list[Any]] = {
    "int": ["1", 1.5, 1.0, True, [1], {"x": 1}, b"\x01", float("nan")],
    "float": ["1.0", True, [1.0], {"x": 1.0}, b"\x01", float("nan")],
    "str": [1, 1.5, True, ["a"], {"a": "b"}, b"a", "a\x00b"],
    "list[str]": ["abc", 1, True, {"a": "b"}, [1], ["a", None], [b"x"], ["a\x00b"],
                  [["a"]], ["x" * 65537]],
    "dict[str,str]": ["a=b", 1, [["a", "b"]], {"a": 1}, {"a": None}, {"a": b"b"},
                      {"a": "b\x00"}, {"a\x00": "b"}, {"a": ["b"]}],
    "bool": [1, 0, "true", 1.0, [True], {"a": True}],
    "dict": ["a", 1, [["a", 1]], {"a": [1]}, {"a": {"b": 1}}, {"a": b"x"},
             {"": 1}, {"k" * 65: 1}, {"a\x00": 1}, {"a": "b\x00"}, {"a": float("nan")},
             {"a": "x" * 4097}],
}


def explicit_bad_values(arg: Arg) -> list[Any]:
    values = list(WRONG_TYPE[arg.type])
    if not arg.nullable:
        values.append(None)
    if arg.lo is not None:
        values.append(arg.lo - 1)
    if arg.hi is not None:
        values.append(arg.hi + 1)
    if arg.type == "float":
        values += [math.inf, -math.inf]
    if arg.type == "int" and arg.hi is not None:
        values.append(2**64 - 1)
    if arg.type == "int" and arg.lo is not None:
        values.append(-2**63)
    if arg.max_len is not None:
        values.append(_too_long(arg))
    if arg.choices is not None:
        values += ["HUP", "term", ""]
    return values


ARG_CASES = [(call, arg, value) for call in KERNEL_CALLS for arg in call.args
             for value in explicit_bad_values(arg)]


def assert_einval_names(raw: RawClient, call: Syscall, arg_name: str, value: Any) -> None:
    args = {**safe_args(call), arg_name: value}
    assert_error(raw.call(call.number, args), Errno.EINVAL, f"{call.name}:", repr(arg_name))


def test_bad_argument_values_are_einval(kernel: Booted, raw: RawClient) -> None:
    """Every argument of every kernel syscall, given each explicit bad value."""
    assert len(ARG_CASES) > 100
    for call, arg, value in ARG_CASES:
        assert_einval_names(raw, call, arg.name, value)
    assert_still_serving(kernel)


@pytest.mark.parametrize("call", KERNEL_CALLS, ids=lambda s: s.name)
def test_unknown_missing_and_unmapped_args_are_einval(kernel: Booted, raw: RawClient,
                                                      call: Syscall) -> None:
    extra = {**safe_args(call), "bogus_arg": 1}
    assert_error(raw.call(call.number, extra), Errno.EINVAL, "'bogus_arg'")
    assert_error(raw.call(call.number, {**safe_args(call), "": 1}), Errno.EINVAL, "''")
    # a bytes key (msgpack bin) is not the argument of the same name
    for arg in call.args:
        assert_error(raw.call(call.number, {**safe_args(call), arg.name.encode(): 1}),
                     Errno.EINVAL, repr(arg.name.encode()))
    if any(arg.required for arg in call.args):
        assert_error(raw.call(call.number, NO_ARGS), Errno.EINVAL, "missing")
    for arg in call.args:
        if arg.required:
            args = {k: v for k, v in safe_args(call).items() if k != arg.name}
            assert_error(raw.call(call.number, args), Errno.EINVAL, "missing", repr(arg.name))
    for not_a_map in ([], [1, 2], 1, "a", None, True, 1.5, b"\x00"):
        assert_error(raw.call(call.number, not_a_map), Errno.EINVAL, call.name,
                     "must be a map")
    assert_still_serving(kernel)


# Random wrong values: anything msgpack carries (bytes travel as frames), then kept
# only when its type is wrong for the argument, or when it is a number out of bounds.
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=8)


def _type_is_wrong(arg: Arg, v: Any) -> bool:
    if v is None:
        return not arg.nullable
    if arg.type == "int":
        return type(v) is not int
    if arg.type == "float":
        return type(v) not in (int, float) or v != v
    if arg.type == "str":
        return type(v) is not str
    if arg.type == "list[str]":
        return type(v) is not list or any(type(x) is not str for x in v)
    if arg.type == "bool":
        return type(v) is not bool
    if arg.type == "dict":  # str keys to scalars
        return type(v) is not dict or any(
            not 0 < len(k) <= 64 or "\x00" in k or x != x or
            (x is not None and type(x) not in (int, float, str, bool))
            or type(x) is str and "\x00" in x for k, x in v.items())
    return type(v) is not dict or any(type(x) is not str for x in v.values())


def _out_of_range(arg: Arg) -> st.SearchStrategy:
    sides = []
    if arg.lo is not None:
        below = (st.integers(-2**63, int(arg.lo) - 1) if arg.type == "int"
                 else st.floats(max_value=arg.lo))
        sides.append(below.filter(lambda v: v < arg.lo))  # not -0.0 for lo=0
    if arg.hi is not None:
        above = (st.integers(int(arg.hi) + 1, 2**64 - 1) if arg.type == "int"
                 else st.floats(min_value=arg.hi))
        sides.append(above.filter(lambda v: v > arg.hi))
    return st.one_of(*sides)


def _bad_value(arg: Arg) -> st.SearchStrategy:
    wrong = ANY_VALUE.filter(lambda v: _type_is_wrong(arg, v))
    if arg.type in ("int", "float") and (arg.lo is not None or arg.hi is not None):
        return wrong | _out_of_range(arg)
    if arg.choices is not None:
        return wrong | st.text(max_size=8).filter(
            lambda s: s not in arg.choices and "\x00" not in s)
    return wrong


CALL_ARGS = [(call, arg) for call in KERNEL_CALLS for arg in call.args]


def test_random_bad_arguments_are_einval(kernel: Booted, raw: RawClient) -> None:
    @settings(max_examples=examples(200), deadline=None)
    @given(case=st.sampled_from(CALL_ARGS).flatmap(
        lambda ca: st.tuples(st.just(ca[0]), st.just(ca[1]), _bad_value(ca[1]))))
    def check(case: tuple) -> None:
        call, arg, value = case
        assert_einval_names(raw, call, arg.name, value)

    check()
    assert_still_serving(kernel)


# -- a driver's bytes limit ------------------------------------------------------------


def test_echo_over_max_len_is_e2big(kernel: Booted) -> None:
    """echo's data is capped at max_len (16 MiB): one byte more is refused by the
    kernel from the frame's size, before any driver sees it."""
    echo = BY_NAME["echo"]
    limit = echo.by_name["data"].max_len
    with RawClient(kernel.home.kernel_endpoint, timeout_ms=60_000) as client:
        client.attach(kernel.home)
        reply = client.call(echo.number, {"data": bytes(limit + 1)})
    assert_error(reply, Errno.E2BIG, "'data'", str(limit + 1), str(limit))
    with well_behaved(kernel) as osh:
        assert osh.echo(b"still here") == b"still here"
    assert_still_serving(kernel)


# -- a flood -----------------------------------------------------------------------------

FLOOD = 20_000


@pytest.mark.timeout(90)
def test_flood_does_not_starve_a_well_behaved_client(kernel: Booted) -> None:
    """One client sends FLOOD nops without reading a reply, keeping the kernel's
    queues at their high-water marks; another client's calls are all answered
    meanwhile, and every flood request is either answered or counted as dropped."""
    flooding = threading.Event()
    sent_all = threading.Event()
    good_done = threading.Event()
    outcome: dict[str, Any] = {}
    before = dropped(kernel).get("reply_queue_full", 0)

    def lost() -> int:
        return dropped(kernel).get("reply_queue_full", 0) - before

    def flood() -> None:
        try:
            with RawClient(kernel.home.kernel_endpoint) as flooder:
                attached = flooder.attach(kernel.home)
                assert "r" in attached, attached
                flooding.set()
                sent = 0
                for seq in range(1000, 1000 + FLOOD):
                    frame = msgpack.packb({"v": ABI_VERSION, "s": seq, "n": NOP})
                    try:
                        flooder.send([frame], zmq.NOBLOCK)
                    except zmq.Again:  # at the high-water mark: wait for room, not for replies
                        if not flooder.sock.poll(10_000, zmq.POLLOUT):
                            break
                        flooder.send([frame], zmq.NOBLOCK)
                    sent += 1
                outcome["sent"] = sent
                sent_all.set()
                good_done.wait(60)
                # read what was answered until every request is accounted for:
                # answered, or its reply dropped (the kernel counts those)
                received = 0
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    while flooder.sock.poll(200):
                        head = flooder.recv()
                        assert 1000 <= head["s"] < 1000 + FLOOD and head["r"] is None, head
                        received += 1
                    if received + lost() == sent:
                        break
                # the flooder's own connection still works
                assert flooder.call(GETPID).get("r") == attached["r"]["pid"]
                outcome["received"] = received
        except BaseException as e:  # reported by the main thread
            outcome["error"] = e
        finally:
            flooding.set()
            sent_all.set()

    thread = threading.Thread(target=flood, name="flooder")
    thread.start()
    try:
        assert flooding.wait(30)
        calls = 0
        with kernel.connect() as osh:
            while not sent_all.is_set() or calls < 200:
                assert osh.nop() is None
                calls += 1
            assert osh.getpid() == osh.pid
    finally:
        good_done.set()
        thread.join(60)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    assert outcome["sent"] == FLOOD
    assert outcome["received"] + lost() == outcome["sent"]
    assert outcome["received"] > 0
    assert_still_serving(kernel)


# -- the drivers' socket -------------------------------------------------------------------

REP = encode({"t": "rep", "i": 1, "r": b"spoofed"})
# The kernel serves drivers and clients on one ROUTER; a message from a routing id
# that is no live driver instance's is a client's, and is dropped as such, unless it
# looks like a driver's (ready, rep, hb), which counts as stale_driver.
DRIVER_JUNK: dict[str, tuple[bytes | None, list[bytes], str]] = {
    "garbage": (b"fake-garbage", [_random_garbage(4, 64)], "malformed"),
    "empty_frame": (b"fake-empty", [b""], "malformed"),
    "many_frames": (b"fake-many", [b"\xc1"] + [b"x"] * 500, "malformed"),
    "not_a_map": (b"fake-list", [msgpack.packb(["rep", 1])], "malformed"),
    "too_deep": (b"fake-deep", [deep_list(MSGPACK_MAX_DEPTH + 1)], "malformed"),
    "frame_ref_missing": (b"fake-ref", [REP[0]], "malformed"),
    "header_too_big": (b"fake-big", [msgpack.packb({"t": "hb", "x": "x" * MAX_HEADER})],
                       "malformed"),
    "fake_reply": (b"fake-reply", REP, "stale_driver"),
    "fake_ready": (b"echo.99", encode({"t": "ready", "services": ["echo"], "token": "guess"}),
                   "stale_driver"),
    "stale_epoch": (b"echo.0", encode({"t": "hb"}), "stale_driver"),
    "fake_request": (b"fake-request", encode({"t": "req", "i": 1, "n": 100}), "no_sequence"),
    "anonymous_garbage": (None, [b"\xc1\xc1"], "malformed"),
    "anonymous_reply": (None, REP, "stale_driver"),
}


def echo_driver(kernel: Booted) -> dict:
    with well_behaved(kernel) as osh:
        return next(d for d in osh.sysinfo()["drivers"] if d["name"] == "echo")


@pytest.mark.parametrize("case", DRIVER_JUNK)
def test_junk_on_the_drivers_socket_is_dropped(kernel: Booted, case: str) -> None:
    identity, frames, counter = DRIVER_JUNK[case]
    driver = echo_driver(kernel)
    before = dropped(kernel).get(counter, 0)
    with RawClient(kernel.home.driver_endpoint, identity=identity) as fake:
        fake.send(frames)
        assert wait_until(lambda: dropped(kernel).get(counter, 0) > before, timeout=10)
    assert dropped(kernel).get(counter, 0) == before + 1
    with well_behaved(kernel) as osh:
        assert osh.echo(b"ping") == b"ping"
    after = echo_driver(kernel)
    assert (after["state"], after["epoch"], after["restarts"]) == \
        ("ready", driver["epoch"], driver["restarts"])
    assert_still_serving(kernel)


# -- and after all of it ----------------------------------------------------------------


def test_kernel_survived_everything(kernel: Booted) -> None:
    """Runs last: the kernel that booted is still the one serving, no message cost it
    an internal error, and its driver never had to be restarted."""
    assert psutil.pid_exists(kernel.pid) and kernel.proc.poll() is None
    assert kernel.home.kernel_pid() == kernel.pid
    with well_behaved(kernel) as osh:
        info = osh.sysinfo()
    assert info["kernel_pid"] == kernel.pid
    assert info["dropped"].get("internal_error", 0) == 0, info["dropped"]
    assert [d["restarts"] for d in info["drivers"]] == [0] * len(info["drivers"])
    assert_still_serving(kernel)
