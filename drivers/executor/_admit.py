"""What a job must pass before the kernel spawns it (spawn_train, spawn_compress):
its config normalized, and everything it names checked as the caller, through
the executor's own connections, so tensorfs's permissions apply: the dataset, the
model, the allocation, the output directory (docs/executor.md, docs/compression.md).
Runs in the executor's background thread; the driver (__init__.py) answers with
the program to spawn.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from syscalls import Errno, SyscallError, format_size

JOB_PROGRAMS = ("drivers.executor.train", "drivers.executor.compress")  # write into --out


class Admission:
    """The checks, on conn(uid) (the executor's connection acting as uid) and the
    model cache (resolve and check_access, as infer uses them)."""

    def __init__(self, conn: Callable[[int], Any], cache: Any) -> None:
        self.conn, self.cache = conn, cache

    # -- spawn_train ------------------------------------------------------------------

    def train(self, uid: int, pid: int, config: dict, alloc_id: str | None) -> dict:
        """spawn_train's config, normalized, checked as uid (process pid), with the
        allocation's GPUs added."""
        from ._config import INTERNAL, memory_bytes, normalize
        inner = sorted(set(config) & set(INTERNAL))
        if inner:  # the executor sets these from an allocation it checked
            raise SyscallError(Errno.EINVAL, f"spawn_train: {', '.join(inner)} cannot be "
                               "set; pass alloc_id, or gpus for the job to allocate")
        try:
            cfg = normalize(config)
        except ValueError as e:
            raise SyscallError(Errno.EINVAL, f"spawn_train: {e}") from None
        need = memory_bytes(cfg, self.conn(uid))
        if alloc_id is not None:
            cfg.update(self.check_alloc(alloc_id, pid, need))
        elif cfg["gpus"]:
            self.check_gpus(cfg["gpus"], need)
        else:
            import psutil
            total = need * cfg["workers"]
            avail = psutil.virtual_memory().available
            if total > avail:
                raise SyscallError(Errno.ENOMEM, f"spawn_train: {cfg['workers']} workers "
                                   f"need about {format_size(total)}, "
                                   f"{format_size(avail)} is available")
        self.check_dataset(uid, cfg)
        self.check_out(uid, cfg)
        return cfg

    def check_alloc(self, alloc_id: str, pid: int, need: int) -> dict:
        devices = self.conn(0).devices()
        for gpu in devices["gpus"]:
            for a in gpu["allocations"]:
                if a["id"] != alloc_id:
                    continue
                if a["pid"] != pid:
                    raise SyscallError(Errno.EPERM, f"spawn_train: allocation {alloc_id} "
                                       f"is process {a['pid']}'s")
                if need > a["bytes"]:
                    raise SyscallError(Errno.ENOMEM, f"spawn_train: a worker needs about "
                                       f"{format_size(need)}; allocation {alloc_id} has "
                                       f"{format_size(a['bytes'])} on each device")
                idx = sorted(g["index"] for g in devices["gpus"]
                             if any(x["id"] == alloc_id for x in g["allocations"]))
                return {"alloc_id": alloc_id, "devices": idx, "gpu_bytes": a["bytes"],
                        "simulated": bool(gpu["simulated"])}
        raise SyscallError(Errno.EBADF, f"spawn_train: no allocation {alloc_id}")

    def check_gpus(self, count: int, need: int) -> None:
        gpus = self.conn(0).devices()["gpus"]
        fit = [g for g in gpus if g["capacity"] >= need]
        if len(fit) < count:
            raise SyscallError(Errno.ENOMEM, f"spawn_train: a worker needs about "
                               f"{format_size(need)} on each of {count} GPUs; {len(fit)} "
                               "GPUs are that big")

    def check_out(self, uid: int, cfg: dict) -> None:
        """The job's out directory: not another running job's (EBUSY), not an existing
        model unless resuming (EEXIST), and one the caller can make: the deepest part
        that exists is a directory it may write (EACCES, ENOTDIR). The job makes the
        rest, as the caller, at its first checkpoint, so a call refused later (by the
        kernel: a full process table, the caller gone) leaves nothing behind. A
        missing top-level directory (/models) is made now, shared, mode 1777, like
        /tmp."""
        out = cfg["out"]
        self.check_busy(out, "spawn_train")
        osh = self.conn(uid)
        self.check_makeable(uid, out, "spawn_train")
        if cfg["resume"]:
            return
        try:
            osh.stat(f"{out}/latest")
        except SyscallError as e:
            if e.errno in (Errno.ENOENT, Errno.ENOTDIR):
                return
            raise
        raise SyscallError(Errno.EEXIST, f"spawn_train: {out} holds a trained model; "
                           "resume it (resume=true) or remove it first (llmos rm -r)")

    def check_busy(self, out: str, call: str) -> None:
        """EBUSY when a running training or compression job writes into out (ps
        shows it by its program and its last two words, --out OUT)."""
        for p in self.conn(0).ps():
            argv = p["argv"]
            if (p["state"] == "running" and any(j in argv for j in JOB_PROGRAMS)
                    and "--job" in argv and argv[-2:] == ["--out", out]):
                raise SyscallError(Errno.EBUSY, f"{call}: job {p['pid']} is writing into "
                                   f"{out}")

    def check_makeable(self, uid: int, out: str, call: str) -> None:
        """The deepest existing part of out is a directory uid may write (EACCES,
        ENOTDIR); a missing top-level directory (/models) is made now, shared, mode
        1777, like /tmp."""
        osh = self.conn(uid)
        parts = out.strip("/").split("/")
        if len(parts) > 1:
            try:
                self.conn(0).mkdir("/" + parts[0], 0o1777)
            except SyscallError as e:
                if e.errno != Errno.EEXIST:
                    raise SyscallError(e.errno, f"{call}: out {out}: {e.message}")
        deepest = None  # the last existing part of out, as uid sees it
        for i in range(len(parts), -1, -1):
            path = "/" + "/".join(parts[:i])
            try:
                deepest = osh.stat(path)
                break
            except SyscallError as e:
                if e.errno not in (Errno.ENOENT,):
                    raise SyscallError(e.errno, f"{call}: out {out}: {e.message}")
        if deepest is None or deepest["type"] != "dir":
            raise SyscallError(Errno.ENOTDIR, f"{call}: out {out}: "
                               f"{deepest and deepest['path']} is not a directory")
        owner, mode = deepest["owner"], deepest["mode"]  # tensorfs's rule: no groups
        bits = (mode >> 6) & 7 if uid == owner else mode & 7
        if uid != 0 and not bits & 2:
            raise SyscallError(Errno.EACCES, f"{call}: out {out}: uid {uid} may not "
                               f"write {deepest['path']} (owner {owner}, mode {mode:o})")

    # -- spawn_compress --------------------------------------------------------------

    def compress(self, uid: int, config: dict) -> dict:
        """spawn_compress's config, normalized and checked as uid."""
        from ._compcfg import NotSupported, normalize
        try:
            cfg = normalize(config)
        except NotSupported as e:
            raise SyscallError(Errno.ENOTSUP, f"spawn_compress: {e}") from None
        except ValueError as e:
            raise SyscallError(Errno.EINVAL, f"spawn_compress: {e}") from None
        try:
            ckpt, mcfg, _ = self.cache.resolve(uid, cfg["model"])
            self.cache.check_access(uid, ckpt, mcfg.get("hf"))
        except SyscallError as e:
            raise SyscallError(e.errno, e.message.replace("infer:", "spawn_compress:",
                                                          1)) from None
        self.check_compress_source(uid, cfg, ckpt, mcfg)
        if "data" in cfg:
            osh = self.conn(uid)
            st = osh.stat(cfg["data"])  # ENOENT, EACCES as they come
            if st["type"] == "dir":
                raise SyscallError(Errno.EISDIR, f"spawn_compress: data {cfg['data']} "
                                   "is a directory")
            if st["type"] != "tensor":
                raise SyscallError(Errno.EINVAL, f"spawn_compress: data {cfg['data']} "
                                   f"is a {st['type']}, not a tensor")
            info = osh.open_tensor(cfg["data"], "r")  # the read permission
            osh.close_tensor(info["fd"])
            shape = info.get("shape") or []
            if len(shape) != 1 or info.get("dtype") not in ("uint8", "int32", "int64") \
                    or shape[0] < 16:
                raise SyscallError(Errno.EINVAL, f"spawn_compress: data {cfg['data']} "
                                   "must be a 1-D tensor of text (uint8) or token ids "
                                   f"(int32, int64) of at least 16, not "
                                   f"{info.get('dtype')} {shape}")
            if "hf" not in mcfg and info["dtype"] != "uint8":
                raise SyscallError(Errno.EINVAL, f"spawn_compress: data {cfg['data']} "
                                   "holds token ids; the byte-level GPT reads bytes")
        if "out" in cfg:
            out = cfg["out"].rstrip("/")
            self.check_busy(out, "spawn_compress")
            try:
                self.conn(uid).stat(out)
                if not cfg.get("force"):
                    raise SyscallError(Errno.EEXIST, f"spawn_compress: {out} exists "
                                       "(force replaces it when the new model is "
                                       "complete)")
            except SyscallError as e:
                if e.errno != Errno.ENOENT:
                    raise
            self.check_makeable(uid, out, "spawn_compress")
        return cfg

    def check_compress_source(self, uid: int, cfg: dict, ckpt: str, mcfg: dict) -> None:
        """EINVAL for a model already int8 (or a structured amount that removes
        every head), ENOTSUP for structured pruning the model's config cannot hold."""
        from ._compcfg import NotSupported, plan, shape_of, structured
        from ._models import text_of
        osh = self.conn(uid)
        names = {e["name"] for e in mcfg.get("hf", ())}
        int8 = bool(mcfg.get("int8"))
        config_json: dict = {}
        if "compression.json" in names:
            try:
                int8 = bool((osh.read_manifest(ckpt) or {}).get("layers"))
            except SyscallError as e:
                if e.errno != Errno.EIO:
                    raise
                raise SyscallError(Errno.EINVAL, f"spawn_compress: {e.message}") from None
        try:
            if "hf" in mcfg:
                config_json = json.loads(text_of(osh.load_tensor(f"{ckpt}/config.json")))
        except (ValueError, UnicodeDecodeError) as e:
            raise SyscallError(Errno.EINVAL, f"spawn_compress: {ckpt}: config.json is "
                               f"unreadable: {e}") from None
        out = cfg.get("out", "").rstrip("/")
        for source in {cfg["model"].rstrip("/"), ckpt.rstrip("/")} if out else ():
            if out == source or out.startswith(source + "/") or source.startswith(out + "/"):
                raise SyscallError(Errno.EINVAL, f"spawn_compress: out {out} overlaps the "
                                   f"model {source}: the source is never overwritten")
        if int8 and cfg["task"] != "eval":
            raise SyscallError(Errno.EINVAL, f"spawn_compress: {cfg['model']} is already "
                               "int8; compress its float source instead")
        if not structured(cfg):
            return
        if "hf" not in mcfg:
            raise SyscallError(Errno.ENOTSUP, "spawn_compress: structured pruning rewrites a "
                               "Hugging Face config; the byte-level GPT's has no head_dim "
                               "or MLP width to change (prune it with sparsity)")
        try:
            plan(*shape_of(config_json), cfg.get("heads", 0.0), cfg.get("mlp", 0.0))
        except NotSupported as e:
            raise SyscallError(Errno.ENOTSUP, f"spawn_compress: {e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise SyscallError(Errno.EINVAL, f"spawn_compress: {e}") from None

    def check_dataset(self, uid: int, cfg: dict) -> None:
        osh = self.conn(uid)
        info = osh.open_tensor(cfg["dataset"], "r")  # ENOENT, EACCES, EISDIR as they come
        osh.close_tensor(info["fd"])
        from ._config import dataset_error
        why = dataset_error(cfg, info)
        if why:
            raise SyscallError(Errno.EINVAL, f"spawn_train: {why}")
