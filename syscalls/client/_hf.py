"""The handle's model calls: import_model, export_model and train_tokenizer
(docs/executor.md, "Hugging Face models"), and evaluate, quantize and prune
(spawn_compress's jobs, docs/compression.md).

Only the declarations live here: the work is in _hfio.py, loaded at the first
call, so that importing the library (every llmos command does) costs nothing
for them; transformers, safetensors and torch load later still, inside it.
"""
from __future__ import annotations

import os
from typing import Any

from ._tensors import Progress


class ModelMethods:
    """Mixed into Llmos; uses its syscall methods and save_tensor(s)."""

    def import_model(self, src_dir: str | os.PathLike, path: str, perm: int = 0o644,
                     progress: Progress | None = None, force: bool = False
                     ) -> dict[str, Any]:
        """Store the Hugging Face model directory src_dir (what save_pretrained
        writes) at the tensorfs directory path, owned by the caller, every tensor
        with mode perm: {path, files, tensors, bytes, architecture, skipped}.

        Everything is checked first (docs/executor.md lists the checks and their
        errnos); then it is written into path + ".importing" and renamed to path,
        so an import that fails or is interrupted leaves nothing (a stale
        .importing from a killed one is removed by the next import of the path).
        path existing is EEXIST unless force: then it is replaced at the end.
        progress(done, total, phase) as save_tensor's, over all the bytes."""
        from ._hfio import import_model
        return import_model(self, src_dir, path, perm, progress, force)

    def export_model(self, path: str, dst_dir: str | os.PathLike, force: bool = False
                     ) -> dict[str, Any]:
        """Write the model at tensorfs path (a model directory, whose `latest`
        names the checkpoint to take when it has one, or a checkpoint) to the local
        directory dst_dir as a Hugging Face model directory: its groups as
        safetensors files, its uint8 tensors as the files they hold.
        {path (the tensorfs directory read), dir, files, tensors, bytes,
        architecture, skipped}. An int8 model (quantize's) is written with its
        weights dequantized to float32, the form from_pretrained loads without a
        quantization library; its compression.json goes along. dst_dir existing and not empty is EEXIST unless
        force; it is written as dst_dir + ".partial" and renamed at the end."""
        from ._hfio import export_model
        return export_model(self, path, dst_dir, force)

    def train_tokenizer(self, dataset: str, path: str, vocab: int = 4096,
                        min_frequency: int = 2, force: bool = False) -> dict[str, Any]:
        """Train a byte-level BPE tokenizer of vocab tokens (<|pad|>, <|bos|>,
        <|eos|> first) on the text dataset (a 1-D uint8 tensor) and store it in
        the tensorfs directory path (made when missing) as tokenizer.json and
        tokenizer_config.json, as import_model stores a model's: a training job
        with arch= and tokenizer=path uses it. {path, vocab, asked, dataset,
        bytes, files, time_s}. EEXIST when path has a tokenizer.json, unless
        force; EINVAL for a vocab outside 260..2**20 or a dataset not text."""
        from ._hftok import train_tokenizer
        return train_tokenizer(self, dataset, path, vocab, min_frequency, force)

    def compress(self, config: dict[str, Any], wait: bool = True,
                 timeout: float | None = None) -> Any:
        """spawn_compress(config), then (wait) wait for the job: its final report
        (info; for a new model with its manifest, read from out/compression.json),
        or the SyscallError it failed with (its errno, when it said one; else
        EIO). wait=False returns the job's pid."""
        from syscalls import Errno, SyscallError
        pid = self.spawn_compress(config)  # type: ignore[attr-defined]
        if not wait:
            return pid
        record = self.wait(pid, timeout=timeout)  # type: ignore[attr-defined]
        info = record.get("info") or {}
        if record["status"] != 0 or info.get("state") != "done":
            errno = Errno.__members__.get(str(info.get("errno")), Errno.EIO)
            why = info.get("error") or f"status {record['status']} ({record['reason']})"
            raise SyscallError(errno, f"{config.get('task')} {config.get('model')}: {why} "
                               f"(its log: log/proc/{pid}.log)")
        if info.get("checkpoint"):  # a new model: its manifest, as stored
            info = {**info, "manifest": self.read_manifest(info["checkpoint"])}
        return info

    def read_manifest(self, path: str) -> dict[str, Any] | None:
        """The manifest (compression.json) of the model directory path, None when it
        has none (not a compressed model); EIO when it is not JSON."""
        import json
        from syscalls import Errno, SyscallError
        try:
            data = self.load_array(f"{path.rstrip('/')}/compression.json")  # type: ignore[attr-defined]
        except SyscallError as e:
            if e.errno in (Errno.ENOENT, Errno.ENOTDIR):
                return None
            raise
        try:
            return json.loads(data.tobytes())
        except ValueError as e:
            raise SyscallError(Errno.EIO, f"{path}/compression.json is not JSON: {e}") from None

    def evaluate(self, model: str, data: str, wait: bool = True, **settings: Any) -> Any:
        """Measure model on data's held-out slice (its last split, 0.05 by default):
        {perplexity, eval_tokens, tokens_per_s_b1, tokens_per_s_b8, bytes, ...}."""
        return self.compress({"task": "eval", "model": model, "data": data, **settings},
                             wait)

    def quantize(self, model: str, out: str, method: str = "int8", wait: bool = True,
                 **settings: Any) -> Any:
        """Write model's int8 form to out, with its manifest: the final report,
        whose manifest is also out/compression.json."""
        return self.compress({"task": "quantize", "model": model, "out": out,
                              "method": method, **settings}, wait)

    def prune(self, model: str, out: str, wait: bool = True, **settings: Any) -> Any:
        """Write a pruned model to out: sparsity=0.5 (unstructured), or heads=...,
        mlp=... (structured), with finetune_steps=N and data= for a recovery
        fine-tune."""
        return self.compress({"task": "prune", "model": model, "out": out, **settings},
                             wait)
