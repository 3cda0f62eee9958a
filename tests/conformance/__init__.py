"""Conformance: the syscall contracts of docs/syscalls.md, checked against a real
booted system by hypothesis state machines (one per syscall family, and one that
interleaves them across processes) and by targeted tests for the errnos the
machines do not reach. test_zz_coverage fails when an errno a contract lists is
never produced. (A package, so its conftest and modules do not shadow tests/'s.)"""
