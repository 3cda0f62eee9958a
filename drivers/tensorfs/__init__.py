"""The tensorfs driver: a durable, permissioned namespace of tensors.

    open_tensor(path, mode, dtype=None, shape=None, perm=0o644, shm=False, whole=False,
                members=None, key=None)
    read_tensor(fd, slice=None, shm=False, member=None)
    write_tensor(fd, data, slice=None, member=None)
    close_tensor(fd, discard=False)          stat, listdir, mkdir, unlink, rename, chmod
    fsck(path="/", repair=False)

Paths such as /models/gpt2/wte live under LLMOS_HOME/tensors/: directories are
real directories (their owner and mode in a .llmos-dir file inside), each tensor
or group of named tensors is one safetensors file (_format.py); /g[name] names
member `name` of the group /g (_paths.py). A write goes to a staging buffer
(memory, or a /dev/shm segment the client maps: _staging.py) and becomes visible
only at close, which writes a temporary file, fsyncs it, renames it over the old
one and fsyncs the directory (_commit.py): a crash leaves the old version or the
new, never a torn one; a write the disk has no room for is ENOSPC and leaves
nothing. The driver is ready at once: a scan in a thread of its own (_scan.py)
then removes the temporary files crashed writes left and counts each owner's
bytes for the quotas. A write may carry an idempotency key, kept in the file's
header, which stat shows. Reads verify the CRC-32 in the header (EIO on a
mismatch) and keep hot tensors in an LRU cache of /dev/shm segments (_cache.py),
handed to clients by hard link, so a cached read copies nothing. Descriptors are
96-bit random tokens bound to the pid that opened them; when a process ends its
descriptors are closed and its uncommitted writes dropped (_driver.py; the calls
on names: _namespace.py).
fsck verifies every file against its header and moves damaged ones into
/lost+found (_fsck.py). Each instance names what it makes (temporary files,
/dev/shm segments) with a tag of its own, and removes only its own, and what
instances before it left. See docs/tensorfs.md.

The modules, each depending only on those before it: _shm, _format, _paths,
_regions, _scan, _commit, _cache, _staging, _fsck, _namespace, _driver. None may
import the kernel or userland.
"""
from __future__ import annotations

from ._commit import write_data_and_crc
from ._driver import TensorFS
from ._format import TensorMeta
from ._shm import prefix as shm_prefix
from ._shm import sweep_all as sweep_segments

__all__ = ["TensorFS", "TensorMeta", "shm_prefix", "sweep_segments", "write_data_and_crc"]
