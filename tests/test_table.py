"""The table, the generated files and the layering rules."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from syscalls import BY_NAME, BY_NUMBER, TABLE, TYPES, Errno, check_args, decode, encode
from syscalls import SyscallError, WireError

ROOT = Path(__file__).resolve().parent.parent


def test_numbers_and_names_are_unique():
    assert len(BY_NUMBER) == len(TABLE) == len(BY_NAME)


def test_every_argument_has_a_known_type():
    for call in TABLE:
        for arg in call.args:
            assert arg.type in TYPES, (call.name, arg.name)


def test_generated_files_are_current():
    r = subprocess.run([sys.executable, "-m", "syscalls.gen", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_errnos_named_in_the_table_exist():
    for call in TABLE:
        for name in call.errors:
            assert name in Errno.__members__, (call.name, name)


@pytest.mark.parametrize("layer,forbidden", [
    ("kernel", r"torch|drivers|userland"),
    ("drivers", r"kernel|userland"),
    ("userland", r"kernel|drivers"),
    ("syscalls", r"kernel|drivers|userland"),
])
def test_layering(layer, forbidden):
    pattern = re.compile(rf"^\s*(import|from)\s+({forbidden})\b", re.M)
    for path in (ROOT / layer).rglob("*.py"):
        assert not pattern.search(path.read_text()), f"{path} imports from {forbidden}"


def test_check_args_fills_defaults_and_rejects_unknowns():
    assert check_args(BY_NAME["wait"], {}) == {"pid": None, "timeout": None}
    with pytest.raises(SyscallError) as e:
        check_args(BY_NAME["wait"], {"pid": 2, "bogus": 1})
    assert e.value.errno == Errno.EINVAL and "bogus" in e.value.message
    with pytest.raises(SyscallError) as e:
        check_args(BY_NAME["kill"], {"pid": True})
    assert e.value.errno == Errno.EINVAL  # a bool is not an int here


def test_wire_moves_bytes_to_frames_and_back():
    frames = encode({"s": 1, "r": [b"abc", {"k": b"\x00" * 10}], "x": "str"})
    assert len(frames) == 3 and frames[1] == b"abc"
    assert b"abc" not in frames[0]
    assert decode(frames) == {"s": 1, "r": [b"abc", {"k": b"\x00" * 10}], "x": "str"}


@pytest.mark.parametrize("frames", [[], [b"\xc1"], [b"\x93\x01"], [b"\x01"],
                                    [encode({"a": b"x"})[0]]])
def test_wire_rejects_garbage(frames):
    with pytest.raises(WireError):
        decode(frames)
