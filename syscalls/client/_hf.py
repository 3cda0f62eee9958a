"""The handle's Hugging Face model calls, import_model and export_model
(docs/executor.md, "Hugging Face models: import and export").

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
