"""The handle's Hugging Face model calls, import_model, export_model and
train_tokenizer (docs/executor.md, "Hugging Face models").

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
        architecture, skipped}. dst_dir existing and not empty is EEXIST unless
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
