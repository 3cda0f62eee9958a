"""Hugging Face model directories in and out of tensorfs: the work of the
handle's import_model and export_model (_hf.py; docs/executor.md, "Hugging Face
models"), loaded at their first call.

A model directory (what `save_pretrained` writes) is stored as a tensorfs
directory of the same layout: each `*.safetensors` file a group of its tensors
(names, dtypes, shapes and bytes kept), every other file a 1-D uint8 tensor of
its bytes. Import checks everything it can before it writes anything (the
config is one transformers knows as a causal LM, the weights are the ones that
config builds, every file is readable, the tokenizer loads), writes into
`NAME.importing` beside the destination and renames it into place, so a model
is there whole or not at all. Export writes `DIR.partial` and renames it.

transformers, safetensors, torch and numpy (and shutil, which brings the
compression modules) are imported inside the functions, never with the library:
a program that moves no model pays nothing for them.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import struct
from pathlib import Path
from typing import Any

from syscalls import Errno, SyscallError, format_size

from ._tensors import Progress

MAX_FILE = 256 * 2**20       # a file that is not weights, at most (a tokenizer is MBs)
STAGING = ".importing"      # suffix of an import in progress: NAME.importing
REPLACED = ".replaced"      # suffix of the model a forced import or export replaces
PARTIAL = ".partial"        # suffix of an export in progress: DIR.partial
# weights in formats import does not read: skipped beside safetensors, never stored
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
# safetensors dtypes tensorfs stores: (numpy dtype of the bytes, torch dtype name)
SAFETENSORS_DTYPES = {"F32": ("<f4", "float32"), "F16": ("<f2", "float16"),
                      "BF16": ("<i2", "bfloat16"), "I64": ("<i8", "int64"),
                      "I32": ("<i4", "int32"), "I16": ("<i2", "int16"),
                      "I8": ("i1", "int8"), "U8": ("u1", "uint8"), "BOOL": ("?", "bool")}


class Weights:
    """One safetensors file as its header says (validated by safetensors itself):
    {name: (dtype, shape, start, stop)} with offsets into its data."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt"):
                pass
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
        except Exception as e:  # SafetensorError, OSError, a header safetensors took
            raise SyscallError(Errno.EIO, f"{path.name}: not a readable safetensors file "
                               f"({_gist(e)})") from None
        self.data_start = 8 + n
        header.pop("__metadata__", None)
        self.tensors: dict[str, tuple[str, list[int], int, int]] = {
            name: (h["dtype"], list(h["shape"]), *h["data_offsets"])
            for name, h in header.items()}
        self.nbytes = max((stop for *_, stop in self.tensors.values()), default=0)

    def views(self) -> dict[str, Any]:
        """The tensors as torch tensors over a copy-on-write mapping of the file:
        nothing is read until it is copied out, and nothing written back."""
        import numpy as np
        import torch
        if not self.nbytes:
            return {name: torch.empty(shape, dtype=getattr(torch, SAFETENSORS_DTYPES[d][1]))
                    for name, (d, shape, _, _) in self.tensors.items()}
        data = np.memmap(self.path, dtype=np.uint8, mode="c", offset=self.data_start,
                         shape=(self.nbytes,))
        out = {}
        for name, (dtype, shape, start, stop) in self.tensors.items():
            np_dtype, torch_dtype = SAFETENSORS_DTYPES[dtype]
            arr = data[start:stop].view(np_dtype).reshape(shape)
            out[name] = torch.from_numpy(arr).view(getattr(torch, torch_dtype))
        return out


def _gist(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_config(src: Path) -> dict[str, Any]:
    try:
        config = json.loads((src / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SyscallError(Errno.EINVAL, f"{src}/config.json is not JSON: {_gist(e)}") \
            from None
    if not isinstance(config, dict):
        raise SyscallError(Errno.EINVAL, f"{src}/config.json is not a JSON object")
    return config


def _causal_lm_config(src: Path, config: dict[str, Any]) -> Any:
    """The transformers config of src, if its model_type is a causal LM the
    installed transformers builds; EINVAL naming it otherwise."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    import transformers
    kind = config.get("model_type")
    if not isinstance(kind, str) or not kind:
        raise SyscallError(Errno.EINVAL, f"{src}/config.json has no model_type")
    if kind not in CONFIG_MAPPING:
        raise SyscallError(Errno.EINVAL, f"model_type {kind!r} ({src}/config.json) is "
                           f"unknown to transformers {transformers.__version__}")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise SyscallError(Errno.EINVAL, f"model_type {kind!r} is not a causal language "
                           "model (transformers has no AutoModelForCausalLM for it)")
    try:
        return AutoConfig.from_pretrained(str(src), local_files_only=True)
    except Exception as e:
        raise SyscallError(Errno.EINVAL, f"{src}/config.json: {_gist(e)}") from None


def _shape_checker(cfg: Any) -> tuple[Any, Any, str]:
    """(meta model, rename(key) -> (model key, converted), its class name): the
    model the config builds, on the meta device (no memory), and how transformers
    renames a checkpoint's keys into it when it loads (legacy names, a missing or
    extra base-model prefix). A converted key is reshaped on load: its shape is
    not compared."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    prefix = model.base_model_prefix
    expected = model.state_dict()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                     rename_source_key)
        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]

        def rename(key: str) -> tuple[str, bool]:
            new, pattern = rename_source_key(key, renamings, converters, prefix, expected)
            if new not in expected and key in expected:
                new, pattern = key, None
            return new, pattern is not None
    except ImportError:  # another transformers: names as they are, or the prefix
        def rename(key: str) -> tuple[str, bool]:
            if key in expected or not prefix:
                return key, False
            bare = key.removeprefix(prefix + ".")
            return (bare if bare in expected else f"{prefix}.{key}"), False
    return model, rename, type(model).__name__


def _ignored(model: Any, which: str) -> re.Pattern | None:
    """The pattern of keys transformers does not miss (which="missing") or does
    not mind finding (which="unexpected") when it loads this model."""
    patterns = set(getattr(model, f"_keys_to_ignore_on_load_{which}", None) or ())
    if which == "unexpected":
        buffers = [n for n, _ in model.named_buffers()]
        if any(n.endswith("rotary_emb.inv_freq") for n in buffers):
            patterns.add(r"rotary_emb\.inv_freq")
        if any(n.endswith("position_ids") for n in buffers):
            patterns.add(r"(^|\.)position_ids$")
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def check_weights(cfg: Any, weights: list[Weights]) -> str:
    """EINVAL naming the first tensor that does not match what cfg builds: one
    missing (tied ones may be: they are the embedding's), one of another shape,
    one the model has no place for. The model's class name otherwise."""
    model, rename, arch = _shape_checker(cfg)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or
               getattr(model, "_tied_weights_keys", None) or ())
    skip_missing, skip_unexpected = _ignored(model, "missing"), _ignored(model, "unexpected")
    found: set[str] = set()
    problems: list[str] = []
    for w in weights:
        for name, (_, shape, _, _) in w.tensors.items():
            key, converted = rename(name)
            if key in expected:
                found.add(key)
                if not converted and shape != expected[key]:
                    problems.append(f"{name} in {w.path.name} has shape {shape}; the "
                                    f"config makes it {expected[key]}")
            elif skip_unexpected is None or not skip_unexpected.search(name):
                problems.append(f"{name} in {w.path.name} is not a weight of {arch} "
                                "with this config")
    missing = [k for k in expected if k not in found and k not in tied
               and (skip_missing is None or not skip_missing.search(k))]
    problems += [f"{k} is missing (the config's {arch} has it, shape {expected[k]})"
                 for k in missing]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SyscallError(Errno.EINVAL, f"the weights do not match config.json: "
                           f"{problems[0]}{more}")
    return arch


def _check_tokenizer(src: Path) -> None:
    from transformers import AutoTokenizer
    try:
        AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as e:
        raise SyscallError(Errno.EINVAL, f"{src} has no tokenizer (tokenizer.json) that "
                           f"transformers loads: {_gist(e)}") from None


def plan_import(src: Path) -> tuple[list[Path], list[Weights], list[str], str]:
    """(the files to store, the safetensors among them read, the files skipped,
    the architecture) of model directory src, after every check import makes;
    SyscallError at the first that fails, before anything is written."""
    if not src.exists():
        raise SyscallError(Errno.ENOENT, f"{src}: no such directory")
    if not src.is_dir():
        raise SyscallError(Errno.ENOTDIR, f"{src}: not a directory")
    if not (src / "config.json").is_file():
        raise SyscallError(Errno.EINVAL, f"no config.json in {src}: not a Hugging Face "
                           "model directory")
    files, skipped = [], []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.name.endswith(OTHER_WEIGHTS):
            skipped.append(p.name)
            continue
        if not p.name.endswith(".safetensors") and p.stat().st_size > MAX_FILE:
            raise SyscallError(Errno.EINVAL, f"{p}: {format_size(p.stat().st_size)}, over "
                               f"the {format_size(MAX_FILE)} a file other than weights "
                               "may have")
        files.append(p)
    config = _read_config(src)
    cfg = _causal_lm_config(src, config)
    weights = [Weights(p) for p in files if p.name.endswith(".safetensors")]
    if not weights:
        also = f" ({', '.join(skipped)} not imported: save it with safe_serialization)" \
            if skipped else ""
        raise SyscallError(Errno.EINVAL, f"no weights in {src}: no *.safetensors file{also}")
    _check_files(src, weights)
    arch = check_weights(cfg, weights)
    _check_tokenizer(src)
    return files, weights, skipped, arch


def _check_files(src: Path, weights: list[Weights]) -> None:
    """Each tensor in one file only, of a dtype tensorfs stores, and every shard
    the index names present."""
    seen: dict[str, str] = {}
    for w in weights:
        for name, (dtype, *_) in w.tensors.items():
            if dtype not in SAFETENSORS_DTYPES:
                raise SyscallError(Errno.EINVAL, f"{name} in {w.path.name} is {dtype}: "
                                   "tensorfs stores F32, F16, BF16, I64, I32, I16, I8, "
                                   "U8 and BOOL")
            if name in seen:
                raise SyscallError(Errno.EINVAL, f"{name} is in both {seen[name]} and "
                                   f"{w.path.name}")
            seen[name] = w.path.name
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SyscallError(Errno.EINVAL, f"{index.name}: no weight_map ({_gist(e)})") \
                from None
        names = {w.path.name for w in weights}
        for shard in sorted(shards - names):
            raise SyscallError(Errno.EINVAL, f"{index.name} names {shard}, which is not "
                               f"in {src}")


def _architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return str(config.get("model_type", "?"))


def import_model(osh: Any, src_dir: str | os.PathLike, path: str, perm: int = 0o644,
                 progress: Progress | None = None, force: bool = False
                 ) -> dict[str, Any]:
    """ModelMethods.import_model, on the handle osh."""
    src = Path(os.path.expanduser(os.fspath(src_dir)))
    path = _model_path(path)
    staging, replaced = path + STAGING, path + REPLACED
    if not force and _exists(osh, path):
        raise SyscallError(Errno.EEXIST, f"{path} exists (import with force to "
                           "replace it)")
    files, weights, skipped, arch = plan_import(src)
    sizes = {p.name: p.stat().st_size for p in files}
    total, done = sum(sizes.values()), 0
    tensors = sum(len(w.tensors) for w in weights)
    by_name = {w.path.name: w for w in weights}
    _makedirs(osh, posixpath.dirname(path))
    _remove_tree(osh, staging)
    try:
        osh.mkdir(staging, 0o755)
        for p in files:
            at = done
            step = None if progress is None else \
                (lambda d, t, ph, at=at: progress(at + d, total, "write"))
            if p.name in by_name:
                osh.save_tensors(f"{staging}/{p.name}",
                                  by_name[p.name].views(), perm=perm, progress=step)
            else:
                import numpy as np
                osh.save_tensor(f"{staging}/{p.name}",
                                 np.fromfile(p, dtype=np.uint8), perm=perm,
                                 progress=step)
            done += sizes[p.name]
        if force and _exists(osh, path):
            _remove_tree(osh, replaced)
            osh.rename(path, replaced)
            try:
                osh.rename(staging, path)
            except BaseException:
                osh.rename(replaced, path)
                raise
            _remove_tree(osh, replaced)
        else:
            osh.rename(staging, path)
    except BaseException:
        try:
            _remove_tree(osh, staging)
        except SyscallError:
            pass  # the next import of path removes it
        raise
    if progress is not None:
        progress(total, total, "done")
    return {"path": path, "files": len(files), "tensors": tensors, "bytes": total,
            "architecture": arch, "skipped": skipped}

def export_model(osh: Any, path: str, dst_dir: str | os.PathLike, force: bool = False
                 ) -> dict[str, Any]:
    """ModelMethods.export_model, on the handle osh."""
    src = _checkpoint(osh, _model_path(path))
    dst = Path(os.path.expanduser(os.fspath(dst_dir)))
    if dst.exists() and not dst.is_dir():
        raise SyscallError(Errno.EEXIST, f"{dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise SyscallError(Errno.EEXIST, f"{dst} is not empty (export with force to "
                           "replace it)")
    entries = osh.listdir(src)
    groups = [e for e in entries if e["type"] == "group"
              and e["name"].endswith(".safetensors")]
    blobs = [e for e in entries if e["type"] == "tensor" and e.get("dtype") == "uint8"
             and len(e.get("shape") or ()) == 1]
    chosen = {e["name"] for e in groups + blobs}
    skipped = [e["name"] for e in entries if e["name"] not in chosen]
    if "config.json" not in chosen:
        raise SyscallError(Errno.EINVAL, f"{src} has no config.json: not a Hugging Face "
                           "model (llmos import stores one)")
    import shutil
    partial = dst.with_name(dst.name + PARTIAL)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    tensors = size = 0
    config: dict[str, Any] = {}
    int8 = _int8_layers(osh, src, chosen)
    try:
        partial.mkdir()
        from safetensors.torch import save_file
        for e in groups:
            state = osh.load_tensors(e["path"])
            if int8:
                state = _dequantized(state, int8)
            save_file(state, str(partial / e["name"]), metadata={"format": "pt"})
            tensors += len(state)
            size += (partial / e["name"]).stat().st_size
            del state
        for e in blobs:
            data = osh.load_array(e["path"]).tobytes()
            if int8 and e["name"] == "compression.json":  # its weights are float now
                manifest = json.loads(data)
                manifest["dequantized_layers"] = manifest.pop("layers", {})
                manifest["exported"] = "float32 weights (int8 values x their scales)"
                data = json.dumps(manifest, indent=1).encode()
            (partial / e["name"]).write_bytes(data)
            size += len(data)
            if e["name"] == "config.json":
                config = json.loads(data)
        _replace_dir(partial, dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"path": src, "dir": str(dst), "files": len(chosen), "tensors": tensors,
            "bytes": size, "architecture": _architecture(config), "skipped": skipped}


def _int8_layers(osh: Any, src: str, names: set[str]) -> dict[str, str]:
    """{layer: kind} of an int8 model's quantized layers (its compression.json),
    {} for any other model."""
    if "compression.json" not in names:
        return {}
    try:
        manifest = json.loads(osh.load_array(f"{src}/compression.json").tobytes())
    except ValueError as e:
        raise SyscallError(Errno.EIO, f"{src}/compression.json is not JSON: {e}") from None
    return dict(manifest.get("layers") or {})


def _dequantized(state: dict[str, Any], layers: dict[str, str]) -> dict[str, Any]:
    """An int8 model's weights as float32, in the layout its architecture's
    from_pretrained loads: each layer's int8 values times its row scales (GPT-2's
    Conv1D transposed back to [in, out]). The manifest stays beside them."""
    out = dict(state)
    for name, kind in layers.items():
        if f"{name}.weight" not in out or f"{name}.weight_scale" not in out:
            continue  # in another safetensors file of the model
        q, scale = out.pop(f"{name}.weight"), out.pop(f"{name}.weight_scale")
        w = q.float() * scale.float()[:, None]
        out[f"{name}.weight"] = (w.t() if kind == "conv1d" else w).contiguous()
    return out


def _model_path(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or path.rstrip("/") == "":
        raise SyscallError(Errno.EINVAL, f"{path!r}: a model is an absolute tensorfs path "
                           "such as /models/NAME")
    return posixpath.normpath(path)


def _exists(osh: Any, path: str) -> bool:
    try:
        osh.stat(path)
        return True
    except SyscallError as e:
        if e.errno in (Errno.ENOENT, Errno.ENOTDIR):
            return False
        raise


def _makedirs(osh: Any, path: str) -> None:
    parts = [p for p in path.split("/") if p]
    for i in range(len(parts)):
        try:
            osh.mkdir("/" + "/".join(parts[:i + 1]), 0o755)
        except SyscallError as e:
            if e.errno != Errno.EEXIST:
                raise


def _remove_tree(osh: Any, path: str) -> None:
    """Remove path and everything below it; nothing there is nothing to do."""
    try:
        st = osh.stat(path)
    except SyscallError as e:
        if e.errno in (Errno.ENOENT, Errno.ENOTDIR):
            return
        if e.errno != Errno.EIO:  # unreadable: unlink does not need its header
            raise
        st = {"type": "tensor"}
    if st["type"] == "dir":
        for entry in osh.listdir(path):
            _remove_tree(osh, entry["path"])
    osh.unlink(path)


def _checkpoint(osh: Any, path: str) -> str:
    """The directory to export: path, or the checkpoint its `latest` names."""
    st = osh.stat(path)
    if st["type"] != "dir":
        raise SyscallError(Errno.ENOTDIR, f"{path} is a {st['type']}, not a model "
                           "directory")
    try:
        latest = osh.load_array(f"{path}/latest")
    except SyscallError as e:
        if e.errno in (Errno.ENOENT, Errno.EISDIR):
            return path
        raise
    try:
        name = latest.tobytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not name or "/" in name or name.startswith("."):
        raise SyscallError(Errno.EIO, f"{path}/latest does not name a checkpoint")
    return f"{path}/{name}"


def _replace_dir(partial: Path, dst: Path) -> None:
    """partial renamed to dst; a dst already there (empty, or replaced by force)
    goes first, put back if the rename fails."""
    import shutil
    if not dst.exists():
        partial.rename(dst)
        return
    aside = dst.with_name(dst.name + REPLACED)
    shutil.rmtree(aside, ignore_errors=True)
    dst.rename(aside)
    try:
        partial.rename(dst)
    except BaseException:
        aside.rename(dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)
