"""The compression job program (spawn_compress; docs/compression.md):

    python -m drivers.executor.compress --job TASK --model SRC [--out DST]

spawned by the kernel as the caller's child, with the normalized config in
LLMOS_COMPRESS_CONFIG (JSON). It runs as the caller's uid, so it reads and
writes tensorfs with the caller's permissions, and reports its progress (jobs
shows it; wait returns the last report).

  eval      perplexity on the held-out slice (the dataset's last `split`),
            decode tokens/s at batch 1 and 8 through the executor's Engine,
            the weights' bytes.
  quantize  int8 weights (_compress.py), then the same measurements.
  prune     unstructured (sparsity) or structured (heads, mlp), with an
            optional recovery fine-tune, then the same measurements.

A new model is written into DST.compressing and renamed to DST when complete
(a forced one replaces DST only then), so a job killed at any moment leaves no
half-written DST; the next job for DST removes what a killed one left. Every
new model carries compression.json, its manifest: what was done, and what it
gained and cost, measured here against the source in this same process.
Exit statuses: 0 done, 1 failed (its last report says why), 143 on SIGTERM.
"""
from __future__ import annotations

import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from typing import Any

from syscalls import Errno, SyscallError

CONFIG_ENV = "LLMOS_COMPRESS_CONFIG"
STAGING = ".compressing"
REPLACED = ".replaced"
ARGV = ["python", "-m", "drivers.executor.compress"]
EXIT_TERMINATED = 128 + signal.SIGTERM


class Stopped(Exception):
    """SIGTERM: stop, removing what this job wrote."""


def _on_term(signum: int, frame: Any) -> None:
    raise Stopped("stopped by SIGTERM")


class Held:
    """The held-out slice and the rest of a dataset, as the model's token ids."""

    def __init__(self, osh: Any, cfg: dict, tokenizer: Any) -> None:
        import numpy as np
        import torch
        path, split = cfg["data"], cfg["split"]
        st = osh.stat(path)
        shape = st.get("shape") or []
        if st["type"] != "tensor" or len(shape) != 1 or \
                st.get("dtype") not in ("uint8", "int32", "int64"):
            raise SyscallError(Errno.EINVAL, f"data {path} must be a 1-D tensor of text "
                               f"(uint8) or token ids (int32, int64), not a {st['type']}")
        n = int(shape[0])
        cut = n - max(2, math.ceil(split * n))
        raw = torch.as_tensor(np.asarray(osh.load_tensor(path))).clone()
        if raw.dtype == torch.uint8 and tokenizer is not None:
            self.held = _encode(tokenizer, bytes(raw[cut:].numpy()))
            # the fine-tune's data: at most the 4 MiB before the held-out slice
            self.train = _encode(tokenizer, bytes(raw[max(0, cut - (4 << 20)):cut].numpy()))
        elif raw.dtype != torch.uint8 and tokenizer is None:
            raise SyscallError(Errno.EINVAL, f"data {path} holds token ids; the byte-level "
                               "GPT reads bytes (a uint8 dataset)")
        else:
            self.held, self.train = raw[cut:].long(), raw[:cut].long()
        self.path, self.split = path, split


def _encode(tok: Any, data: bytes) -> Any:
    import torch
    from syscalls.client import text_pieces
    ids: list[int] = []
    for piece in text_pieces(data.decode("utf-8", errors="replace")):
        ids += tok(piece, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


class CompressJob:
    def __init__(self, osh: Any, cfg: dict) -> None:
        self.osh, self.cfg = osh, cfg
        self.t0 = time.monotonic()
        self.staging: str | None = None

    def say(self, info: dict[str, Any]) -> None:
        print(json.dumps(info), flush=True)
        self.osh.report(info)

    # -- loading ---------------------------------------------------------------------

    def load(self) -> Any:
        """The source, loaded as the executor loads it for infer (the caller's
        permissions; int8 layers rebuilt): a _models.Loaded."""
        from ._models import ModelCache
        cache = ModelCache(lambda uid: self.osh, lambda: "cpu", 1 << 62, 8)
        return cache.load(self.osh.uid, self.cfg["model"])

    def raw(self, m: Any) -> Any:
        """The torch module: the byte GPT itself, or the transformers model."""
        return m.model.model if m.tokenizer is not None else m.model

    # -- measuring -------------------------------------------------------------------

    def quality(self, raw: Any, context: int, held: Held | None) -> dict[str, Any]:
        """The weights' bytes and, with data, the held-out perplexity."""
        from ._compress import perplexity, state_bytes
        from .checkpoint import state_without_aliases
        out: dict[str, Any] = {"bytes": state_bytes(state_without_aliases(raw))}
        if held is not None and self.cfg["measure"]:
            raw.eval()
            ppl, n = perplexity(raw, held.held, min(self.cfg["block_size"], context),
                                self.cfg["eval_tokens"])
            out.update(perplexity=ppl, eval_tokens=n)
        return out

    def rates(self, m: Any, models: list[Any], held: Held | None) -> list[dict[str, float]]:
        """Decode tokens/s of each engine model at batch 1 and 8 (interleaved)."""
        from ._compress import decode_rates
        if not self.cfg["measure"]:
            return [{} for _ in models]
        if held is not None:
            prompt = [int(t) for t in held.held[:8]]
        else:
            prompt = [int(t) for t in (m.tokenizer("def ")["input_ids"] if m.tokenizer
                                       else b"def ")] or [0]
        block = min(x.config.block_size for x in models)
        tokens = max(1, min(self.cfg["decode_tokens"], block - len(prompt) - 1))
        return [{**{f"tokens_per_s_b{b}": r[0] for b, r in got.items()},
                 **{f"tokens_per_s_b{b}_range": [r[1], r[2]] for b, r in got.items()}}
                for got in decode_rates(models, prompt, tokens)]

    def engine_model(self, m: Any, raw: Any) -> Any:
        """What the Engine runs for raw: the byte GPT itself, or raw wrapped."""
        if m.tokenizer is None:
            return raw
        from ._hf import HFCausalLM
        return HFCausalLM(raw, m.model.config.block_size)

    # -- the tasks -----------------------------------------------------------------------

    def run(self) -> int:
        import torch
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(max(1, cores))
        task = self.cfg["task"]
        self.say({"state": "loading", "task": task, "model": self.cfg["model"]})
        m = self.load()
        held = Held(self.osh, self.cfg, m.tokenizer) if "data" in self.cfg else None
        context = m.model.config.block_size
        if task == "eval":
            self.say({"state": "measuring", "task": task})
            got = {**self.quality(self.raw(m), context, held),
                   **self.rates(m, [m.model], held)[0]}
            got = {k: v for k, v in got.items() if not k.endswith("_range")}
            self.say({"state": "done", "task": task, "model": m.path, "data": self.cfg["data"],
                      "split": self.cfg["split"], **got,
                      "time_s": round(time.monotonic() - self.t0, 3)})
            return 0
        self.say({"state": "measuring source", "task": task})
        source = self.raw(m)
        before = self.quality(source, context, held)
        if task == "quantize":
            new, settings, extra = self.quantize(source)
        else:
            new, settings, extra = self.prune(m, source, held)
        self.say({"state": "measuring result", "task": task})
        after = self.quality(new, context, held)
        speed_before, speed_after = self.rates(m, [m.model, self.engine_model(m, new)], held)
        before.update(speed_before)
        after.update(speed_after)
        manifest = self.manifest(m, settings, before, after, extra, held)
        self.say({"state": "writing", "task": task})
        self.write(m, new, manifest)
        self.say({"state": "done", "task": task, "checkpoint": self.cfg["out"],
                  "method": manifest["method"], "bytes_before": before["bytes"],
                  "bytes": after["bytes"], "perplexity_before": before.get("perplexity"),
                  "perplexity": after.get("perplexity"), "speed": manifest["speed"],
                  "time_s": manifest["time_s"]})
        return 0

    def quantize(self, source: Any) -> tuple[Any, dict, dict]:
        """(a quantized copy of source, settings, what the manifest adds)."""
        import copy
        from ._compress import layer_bytes, linear_layers, quantize_int8
        self.say({"state": "quantizing", "task": "quantize"})
        raw = copy.deepcopy(source)
        float_bytes = layer_bytes(raw, [n for n, _, _ in linear_layers(raw)])
        layers = quantize_int8(raw)
        int8_bytes = layer_bytes(raw, layers)
        return raw, {"method": "int8", "scheme": "per-output-channel symmetric int8 "
                     "weights, dynamic int8 activations (torch.ao fbgemm)"}, {
            "layers": layers,
            "layer_bytes": {"before": float_bytes, "after": int8_bytes,
                            "ratio": float_bytes / max(1, int8_bytes)}}

    def prune(self, m: Any, source: Any, held: Held | None) -> tuple[Any, dict, dict]:
        """(a pruned copy of source, fine-tuned when asked, settings, extra)."""
        import copy
        import torch
        from . import _compress
        from ._compcfg import structured
        cfg = self.cfg
        extra: dict[str, Any] = {}
        self.say({"state": "pruning", "task": "prune"})
        context = m.model.config.block_size
        if not structured(cfg):
            raw = copy.deepcopy(source)
            settings = {"method": "magnitude", "scope": "global, unstructured (lm_head and "
                        "embeddings kept)", "sparsity": cfg["sparsity"]}
            extra["pruned"] = _compress.prune_magnitude(raw, cfg["sparsity"])
        else:
            if m.tokenizer is None:
                raise SyscallError(Errno.ENOTSUP, "prune: structured pruning rewrites a "
                                   "Hugging Face config; the byte-level GPT's has no "
                                   "head_dim or MLP width to change")
            try:
                s = _compress.Structure(source)
            except NotImplementedError as e:
                raise SyscallError(Errno.ENOTSUP, f"prune: {e}") from None
            from ._compcfg import plan
            keep_heads, keep_mlp = plan(s.kind, s.heads, s.kv_heads, s.hidden, s.neurons(),
                                        cfg.get("heads", 0.0), cfg.get("mlp", 0.0))
            batches = []
            if held is not None:  # calibration: 8 windows of the data before the held-out
                span = min(cfg["block_size"], context - 1)
                full = [w[:-1] for w in _compress.windows(held.train, span, 8 * span)
                        if len(w) == span + 1][:8]
                batches = [torch.stack(full)] if full else []
            config, state = s.prune(keep_heads, keep_mlp, batches)
            dtype = next(source.parameters()).dtype  # a bf16 source stays bf16
            raw = _compress.build_hf(config, state, dtype)
            settings = {"method": "structured", "heads": cfg.get("heads", 0.0),
                        "mlp": cfg.get("mlp", 0.0), "heads_kept": keep_heads,
                        "mlp_kept": keep_mlp, "importance": "activation norm x "
                        "output-weight norm" + (" on 8 calibration windows" if batches
                                                else " (weights only: no data)")}
            extra["shape"] = {"heads": [s.heads, keep_heads], "kv_heads":
                              [s.kv_heads, keep_heads // (s.heads // s.kv_heads)],
                              "mlp": [s.neurons(), keep_mlp]}
        if cfg["finetune_steps"]:
            assert held is not None
            extra["perplexity_before_finetune"] = self.quality(raw, context, held).get(
                "perplexity")
            extra["finetune"] = self.finetune(raw, held, context)
            if not structured(cfg):  # the pruned weights stayed zero
                extra["pruned"]["after_finetune"] = _compress.zero_fraction(raw)
            settings["finetune_steps"] = cfg["finetune_steps"]
        return raw, settings, extra

    def finetune(self, raw: Any, held: Held, context: int) -> dict[str, Any]:
        """A short recovery fine-tune (AdamW, linear warmup, cosine decay) on the
        data before the held-out slice; unstructured pruning's zeros stay zero."""
        import torch
        import torch.nn.functional as F
        from ._compcfg import structured
        from ._compress import linear_layers, logits_of
        from .trainer import lr_at
        from ._compcfg import FINETUNE
        cfg = {**FINETUNE, **self.cfg}
        steps, t = cfg["finetune_steps"], min(cfg["block_size"], context - 1)
        ids = held.train
        if len(ids) < t + 2:
            raise SyscallError(Errno.EINVAL, f"prune: data {cfg['data']} has "
                               f"{len(ids)} tokens before its held-out slice; the "
                               f"fine-tune needs more than {t + 1}")
        masks = [] if structured(cfg) else [(m, m.weight != 0) for _, m, _ in
                                             linear_layers(raw, output_too=False)]
        torch.manual_seed(cfg["seed"])
        raw.train()
        opt = torch.optim.AdamW(raw.parameters(), lr=cfg["lr"], betas=(0.9, 0.95),
                                weight_decay=0.0)
        sched = {"lr": cfg["lr"], "min_lr": cfg["lr"] / 10, "warmup": min(10, steps // 10),
                 "steps": steps}
        offsets = torch.arange(t + 1)
        first = last = float("nan")
        losses: list[float] = []
        started = time.monotonic()
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, sched)
            starts = torch.randint(len(ids) - t - 1, (cfg["batch_size"],))
            chunk = ids[starts[:, None] + offsets]
            logits = logits_of(raw, chunk[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                   chunk[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                for m, mask in masks:
                    m.weight.mul_(mask)
            losses.append(float(loss))
            last = sum(losses[-10:]) / len(losses[-10:])  # one batch's loss is noise
            if step == min(9, steps - 1):
                first = sum(losses) / len(losses)
            if (step + 1) % 10 == 0 or step + 1 == steps:
                self.say({"state": "fine-tuning", "task": "prune", "step": step + 1,
                          "steps": steps, "loss": last, "loss0": first})
        raw.eval()
        return {"steps": steps, "loss0": first, "loss": last, "lr": cfg["lr"],
                "batch_size": cfg["batch_size"], "block_size": t,
                "time_s": round(time.monotonic() - started, 3)}

    # -- the manifest and the new model -----------------------------------------------------

    def manifest(self, m: Any, settings: dict, before: dict, after: dict, extra: dict,
                 held: Held | None) -> dict[str, Any]:
        from ._compress import sizes_verdict

        def pair(key: str) -> dict[str, Any] | None:
            if key not in before or key not in after:
                return None
            b, a = before[key], after[key]
            out = {"before": b, "after": a, "ratio": a / b if b else None}
            if f"{key}_range" in before:  # the lowest and highest of the runs
                out.update(before_range=before[f"{key}_range"],
                           after_range=after[f"{key}_range"])
            return out
        rates = {f"batch{b}": pair(f"tokens_per_s_b{b}") for b in (1, 8)}
        import torch
        return {
            "method": settings["method"], "task": self.cfg["task"], "settings": settings,
            "source": self.cfg["model"], "source_checkpoint": m.path,
            "architecture": m.architecture,
            "bytes": {"before": before["bytes"], "after": after["bytes"],
                      "ratio": before["bytes"] / max(1, after["bytes"])},
            "perplexity": {**(pair("perplexity") or {}), "data": held.path,
                           "split": held.split, "tokens": after.get("eval_tokens")}
            if held is not None and self.cfg["measure"] else
            {"why": "not measured: no data given" if held is None else
             "not measured (measure = false: --no-measure)"},
            "tokens_per_s": rates if self.cfg["measure"] else
            {"why": "not measured (measure = false: --no-measure)"},
            "speed": sizes_verdict(rates, dense=settings["method"] == "magnitude")
            if self.cfg["measure"] else "speed not measured",
            **extra,
            "measured_on": {"machine": platform.machine(), "cpus": len(os.sched_getaffinity(0)),
                            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                            "device": "cpu"},
            "created": time.time(), "time_s": round(time.monotonic() - self.t0, 3),
        }

    def write(self, m: Any, raw: Any, manifest: dict[str, Any]) -> None:
        """The new model into out.compressing, renamed to out when complete."""
        from ._compress import MANIFEST
        from .checkpoint import _bytes_tensor, exists, makedirs, remove_tree, \
            state_without_aliases
        osh, out = self.osh, self.cfg["out"].rstrip("/")
        staging = out + STAGING
        if exists(osh, staging):  # what a killed job left
            remove_tree(osh, staging)
        parent = out.rpartition("/")[0]
        if parent:
            makedirs(osh, parent)
        self.staging = staging
        osh.mkdir(staging)
        state = {k: v.detach().cpu().contiguous() for k, v in
                 state_without_aliases(raw).items()}
        if m.tokenizer is not None:
            from ._hftrain import small_files
            files = small_files(osh, m.path)
            for name in ("model.safetensors.index.json", MANIFEST):
                files.pop(name, None)
            files["config.json"] = raw.config.to_json_string(use_diff=False).encode()
            osh.save_tensors(f"{staging}/model.safetensors", state)
            for name, data in files.items():
                osh.save_tensor(f"{staging}/{name}", _bytes_tensor(data))
        else:
            config = {"model": raw.config.to_dict(), "step": None, "loss": None,
                      "source": m.path}  # not the source's training figures
            if manifest.get("layers"):
                config["int8"] = manifest["layers"]
            osh.save_tensors(f"{staging}/model", state)
            osh.save_tensor(f"{staging}/config", _bytes_tensor(json.dumps(config).encode()))
        osh.save_tensor(f"{staging}/{MANIFEST}",
                        _bytes_tensor(json.dumps(manifest, indent=1).encode()))
        old = None
        if exists(osh, out):
            if not self.cfg.get("force"):
                raise SyscallError(Errno.EEXIST, f"{out} appeared while compressing; "
                                   "nothing replaced (force replaces it)")
            old = out + REPLACED
            if exists(osh, old):
                remove_tree(osh, old)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the swap is not interrupted
        try:
            if old is not None:
                osh.rename(out, old)
            try:
                osh.rename(staging, out)
            except SyscallError:
                if old is not None:  # put the old model back
                    osh.rename(old, out)
                raise
            self.staging = None
        finally:
            signal.signal(signal.SIGTERM, _on_term)
        if old is not None:
            remove_tree(osh, old)

    def clean(self) -> None:
        """Remove a staging directory this job began (it failed or was stopped)."""
        if self.staging is None:
            return
        from .checkpoint import exists, remove_tree
        try:
            if exists(self.osh, self.staging):
                remove_tree(self.osh, self.staging)
        except SyscallError:
            pass


def main() -> int:
    signal.signal(signal.SIGTERM, _on_term)
    from syscalls.client import connect
    from ._compcfg import normalize
    osh = connect()
    job = None
    try:
        job = CompressJob(osh, normalize(json.loads(os.environ[CONFIG_ENV])))
        status = job.run()
    except Stopped as e:
        status = EXIT_TERMINATED
        _final(osh, {"state": "stopped", "error": str(e)})
    except SyscallError as e:
        status = 1
        _final(osh, {"state": "failed", "error": f"{e.errno.name}: {e.message}",
                     "errno": e.errno.name})
    except BaseException as e:  # noqa: B902 - a bug must still end the job as failed
        traceback.print_exc()
        status = 1
        _final(osh, {"state": "failed", "error": f"{type(e).__name__}: {e}"})
    finally:
        if job is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            job.clean()
    osh.exit(status)
    return status


def _final(osh: Any, info: dict[str, Any]) -> None:
    print(json.dumps(info), flush=True)
    try:
        osh.report(info)
    except SyscallError:
        pass


if __name__ == "__main__":
    sys.exit(main())
