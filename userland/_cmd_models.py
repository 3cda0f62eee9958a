"""The model commands: corpus, train, infer, chat, models, import, export,
tokenizer (docs/executor.md). The compression commands are _cmd_compress.py's.

infer's and chat's defaults are the syscall table's (syscalls/_table.py), so the
command, the shell and the library generate alike when nothing is said.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from syscalls import BY_NAME, Errno, SyscallError

from . import _views
from ._cmd_devices import alloc_id
from ._cmd_procs import exit_status
from ._cmd_tensors import mode_arg
from ._argtypes import key_values, sized
from ._command import Session, arg, command, shows
from .corpus import read_corpus

INFER = BY_NAME["infer"].by_name
POLL_S = 0.5


def makedirs(osh: Any, path: str) -> None:
    """The parent directories of path, made when missing."""
    parts = [p for p in path.split("/") if p][:-1]
    for i in range(len(parts)):
        try:
            osh.mkdir("/" + "/".join(parts[:i + 1]))
        except SyscallError as e:
            if e.errno != Errno.EEXIST:
                raise


@command("corpus", "models", "store text files (default: this Python's standard library "
         "sources) as one uint8 tensor: a training dataset",
         arg("path", metavar="PATH", complete="tensor", help="e.g. /datasets/pystdlib"),
         arg("files", nargs="*", metavar="FILE", complete="local",
             help="text files, or directories of them (default: the standard library)"),
         arg("--max-bytes", type=sized, default="8MiB", metavar="SIZE",
             help="stop at this many bytes"),
         syscalls=("mkdir", "open_tensor", "close_tensor"),
         details="Makes PATH's missing parent directories.")
def corpus(s: Session, a: argparse.Namespace) -> None:
    data = read_corpus([Path(os.path.expanduser(f)) for f in a.files], a.max_bytes)
    if not data:
        raise SyscallError(Errno.ENOENT, "corpus: no text found in the files given")
    path = s.resolve(a.path)
    makedirs(s.osh, path)
    import numpy as np
    s.osh.save_tensor(path, np.frombuffer(data, dtype=np.uint8))
    s.line(f"{path}: {len(data):,} bytes of text")


def scalar(text: str) -> Any:
    """A KEY=VALUE's value: an int, a float, true/false, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


TRAIN_FLAGS = (("--steps", "steps", int), ("--workers", "workers", int),
               ("--layers", "n_layer", int), ("--heads", "n_head", int),
               ("--width", "n_embd", int), ("--context", "block_size", int),
               ("--batch", "batch_size", int), ("--lr", "lr", float),
               ("--checkpoint-every", "checkpoint_every", int),
               ("--restarts", "restarts", int), ("--gpus", "gpus", int),
               ("--seed", "seed", int), ("--ffn", "ffn", int), ("--arch", "arch", str),
               ("--alpha", "distill_alpha", float),
               ("--temperature", "distill_temperature", float))
PATH_KEYS = ("out", "dataset", "base", "tokenizer", "teacher")  # resolved against the cwd


@command("train", "models", "train a model (spawn_train: the byte-level GPT, or a Hugging "
         "Face architecture) and follow its progress until it ends",
         arg("name", metavar="NAME", help="the model's name: it goes to /models/NAME"),
         arg("settings", nargs="*", metavar="KEY=VALUE",
             help="any training config key (docs/executor.md), e.g. steps=300 lr=2e-3"),
         arg("--data", required=True, metavar="PATH", complete="tensor",
             help="a 1-D tensor of text, uint8 (llmos corpus makes one), or of token ids "
                  "(int32, int64) for a Hugging Face model"),
         *(arg(flag, dest=key, type=kind,
               metavar={int: "N", float: "X"}.get(kind, "NAME"),
               help=f"the config's {key}") for flag, key, kind in TRAIN_FLAGS),
         arg("--base", metavar="PATH", complete="tensor",
             help="fine-tune this Hugging Face model (llmos import stores one)"),
         arg("--tokenizer", metavar="PATH", complete="tensor",
             help="with --arch: the directory of the new model's tokenizer.json (llmos "
                  "tokenizer train makes one)"),
         arg("--out", metavar="PATH", complete="tensor",
             help="where checkpoints go (default: /models/NAME)"),
         arg("--teacher", metavar="PATH", complete="tensor",
             help="distill: the student also learns this Hugging Face model's softened "
                  "distribution (--alpha, --temperature; docs/compression.md)"),
         arg("--nodes", metavar="A,B",
             help="run the workers on these nodes, round robin (llmos nodes; "
                  "docs/scaling.md)"),
         arg("--resume", action="store_true", help="go on from the last checkpoint"),
         arg("--alloc", metavar="ID", complete="alloc",
             help="train on this session's GPU allocation (a prefix will do)"),
         arg("-d", "--detach", action="store_true",
             help="print the job's pid and return (jobs shows it, wait reaps it)"),
         syscalls=("spawn_train", "wait", "ps", "kill"),
         json_keys="the job's wait record {pid, status, reason, info}; with -d, its pid",
         details="--base fine-tunes an imported model; --arch llama --tokenizer PATH "
                 "trains a new one (docs/executor.md, Training Hugging Face models); "
                 "--teacher distills a larger model into it (docs/compression.md). "
                 "Ctrl-C asks the job to stop: it writes a checkpoint and ends (resume "
                 "it with --resume); a second Ctrl-C kills it. The exit status is the "
                 "job's (130 after Ctrl-C).")
def train(s: Session, a: argparse.Namespace) -> Any:
    config: dict[str, Any] = {"name": a.name, "dataset": s.resolve(a.data)}
    for _, key, _ in TRAIN_FLAGS:
        if getattr(a, key) is not None:
            config[key] = getattr(a, key)
    for key in ("out", "base", "tokenizer", "teacher"):
        if getattr(a, key):
            config[key] = s.resolve(getattr(a, key))
    if a.resume:
        config["resume"] = True
    if a.nodes:
        config["nodes"] = a.nodes
    for key, value in key_values(a.settings).items():
        config[key] = s.resolve(value) if key in PATH_KEYS else scalar(value)
    pid, record = run_job(
        s, a, lambda: s.osh.spawn_train(config, alloc_id(s, a.alloc) if a.alloc else None),
        lambda pid: f"training job {pid}: {a.name} on {config['dataset']} (Ctrl-C stops "
                    "it, keeping a checkpoint)")
    if record is None:
        return pid if s.json else None
    info = record.get("info") or {}
    if s.json:
        return record
    s.line(_views.progress(info) if info else _views.wait_line(record))
    if info.get("checkpoint"):
        s.line(f"checkpoint: {info['checkpoint']}")
    if info.get("state") == "stopped":  # the same command again, so the same model
        words = [w for w in s.words if w not in ("--resume", "-d", "--detach")]
        s.line(f"resume with: llmos {shlex.join(words)} --resume")
    elif record["status"] != 0:
        s.note(_views.wait_line({**record, "info": {}}))
    return None


def run_job(s: Session, a: argparse.Namespace, spawn: Callable[[], int],
            headline: Callable[[int], str]) -> tuple[int, dict[str, Any] | None]:
    """Start a job (spawn() -> its pid) and, unless -d (a.detach: its pid printed),
    follow it to its end: (pid, its wait record, or None when detached), with
    s.status the job's (130 after Ctrl-C)."""
    with s.unbounded():
        pid = spawn()
    if a.detach:
        if not s.json:
            s.line(str(pid))
        return pid, None
    if not s.json:
        s.line(headline(pid))
    record, interrupted = follow(s, pid)
    s.status = 130 if interrupted else exit_status(record)
    return pid, record


def follow(s: Session, pid: int) -> tuple[dict[str, Any], bool]:
    """Show job pid's progress until it ends (one line rewritten in place on a
    terminal, else a line per change); its wait record, and whether Ctrl-C was
    pressed. The first Ctrl-C asks the job to stop (TERM: it checkpoints), the next
    kills it; the wait goes on either way, so the job is always reaped."""
    show, last, interrupts = StatusLine(quiet=s.json), "", 0
    osh = s.osh
    try:
        while True:
            try:
                try:
                    with s.unbounded():
                        return osh.wait(pid, timeout=POLL_S), interrupts > 0
                except SyscallError as e:
                    if e.errno == Errno.ECHILD:  # reaped by a wait we gave up on: ps -a
                        return ended_record(osh, pid), interrupts > 0  # still knows how
                    if e.errno != Errno.ETIMEDOUT:
                        raise
                me = next((p for p in osh.ps() if p["pid"] == pid), None)
                line = _views.progress(me["info"]) if me and me.get("info") else "starting"
                if line != last:
                    show(line)
                last = line
            except KeyboardInterrupt:
                interrupts += 1
                show.clear()
                try:
                    osh.kill(pid, "KILL" if interrupts > 1 else "TERM")
                except SyscallError as e:
                    if e.errno != Errno.ESRCH:
                        raise
                if not s.json:
                    s.note("killing the job" if interrupts > 1 else
                           "stopping the job: it writes a checkpoint, then ends (Ctrl-C "
                           "again kills it)")
    finally:
        show.clear()


def ended_record(osh: Any, pid: int) -> dict[str, Any]:
    """How process pid ended, as ps -a remembers it (ECHILD if it does not)."""
    for p in osh.ps(all=True):
        if p["pid"] == pid and p["state"] != "running":
            return {k: p[k] for k in ("pid", "status", "reason", "info")}
    raise SyscallError(Errno.ECHILD, f"wait: process {pid} was reaped, and ps -a no "
                       "longer knows how it ended")


class StatusLine:
    """A progress display: one line rewritten in place on a terminal, else a line
    each time it changes."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.width = 0

    def __call__(self, line: str) -> None:
        if self.quiet:
            return
        if sys.stdout.isatty():
            line = line[:os.get_terminal_size().columns - 1]
            sys.stdout.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def clear(self) -> None:
        if self.width:
            sys.stdout.write("\r" + " " * self.width + "\r")
            sys.stdout.flush()
            self.width = 0


def _sampling(tokens: int) -> list[Any]:
    return [
        arg("-n", "--max-tokens", type=int, default=tokens, metavar="N",
            help="new tokens at most (the executor allows up to its infer_max_tokens "
                 "setting, 4096 by default)"),
        arg("-t", "--temperature", type=float, default=INFER["temperature"].default,
            metavar="T", help="sampling temperature; 0 is greedy"),
        arg("-k", "--top-k", type=int, default=INFER["top_k"].default, metavar="K",
            help="sample among the K likeliest tokens; 0: all"),
        arg("--seed", type=int, metavar="N", help="sampling seed (default: a random one)"),
        arg("-p", "--top-p", type=float, default=INFER["top_p"].default, metavar="P",
            help="sample among the likeliest tokens whose probabilities reach P; 1: all"),
        arg("--stop", action="append", default=[], metavar="TEXT",
            help="end before this text (repeatable)"),
        arg("--truncate", action="store_true",
            help="keep the last tokens of a prompt over a Hugging Face model's context")]


def _sampling_kw(a: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": a.max_tokens, "temperature": a.temperature, "top_k": a.top_k,
            "seed": a.seed, "top_p": a.top_p, "stop": a.stop, "truncate": a.truncate}


def generate(s: Session, model: str, prompt: str | None, a: argparse.Namespace,
             echo: str = "", messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Generate after prompt (or messages), writing echo and then the text as it
    comes; the final chunk, with the whole text as "all". Nothing is written if the
    call fails before it generates; Ctrl-C stops the generation too."""
    final: dict[str, Any] = {}
    wrote = False
    text: list[str] = []
    with s.unbounded() as osh:
        chunks = osh.infer(model, prompt, messages=messages, stream=True, **_sampling_kw(a))
        try:
            for chunk in chunks:
                if not wrote:
                    sys.stdout.write(echo)
                    wrote = True
                text.append(chunk["text"])
                sys.stdout.write(chunk["text"])
                sys.stdout.flush()
                if chunk.get("finish_reason"):
                    final = chunk
        finally:
            chunks.close()
            if wrote:
                sys.stdout.write("\n")
                sys.stdout.flush()
    return {**final, "all": "".join(text)}


@command("infer", "models", "generate text after PROMPT with a model, streamed",
         arg("model", metavar="MODEL", complete="tensor",
             help="a model directory (its latest checkpoint) or a checkpoint"),
         arg("prompt", nargs="+", metavar="PROMPT", help="its words are joined with spaces"),
         *_sampling(INFER["max_tokens"].default),
         arg("-q", "--quiet", action="store_true", help="do not echo the prompt"),
         arg("-v", "--verbose", action="store_true",
             help="then tokens, time, tokens/s and seed on stderr"),
         syscalls=("infer",),
         json_keys="infer()'s record: {text, tokens, prompt_tokens, finish_reason, seed, "
                   "time_s} (generated whole, not streamed)",
         details="Ctrl-C stops the generation.")
def infer(s: Session, a: argparse.Namespace) -> dict[str, Any] | None:
    prompt = " ".join(a.prompt)
    model = s.resolve(a.model)
    if s.json:
        with s.unbounded() as osh:
            return osh.infer(model, prompt, **_sampling_kw(a))
    final = generate(s, model, prompt, a, echo="" if a.quiet else prompt)
    if a.verbose and final:
        rate = final["tokens"] / final["time_s"] if final.get("time_s") else 0.0
        s.note(f"[{final['tokens']} tokens in {final['time_s']:.2f}s, {rate:.0f} tok/s, "
               f"seed {final['seed']}, {final['finish_reason']}]")
    return None


def read_line(s: Session, prompt: str) -> str | None:
    """A line for chat; None at the end of input."""
    if sys.stdin.isatty():
        if getattr(s, "_chat_session", None) is None:
            from prompt_toolkit import PromptSession
            s._chat_session = PromptSession()  # type: ignore[attr-defined]
        try:
            return s._chat_session.prompt(prompt)  # type: ignore[attr-defined]
        except (EOFError, KeyboardInterrupt):
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


@command("chat", "models", "talk to a model: each line you type is a prompt, its "
         "continuation is streamed back",
         arg("model", metavar="MODEL", complete="tensor"), *_sampling(100),
         syscalls=("stat", "infer"),
         details="A model with a chat template (a Hugging Face model's) gets the "
                 "conversation so far as messages, each line a user turn; the byte-level "
                 "GPT continues text, each line a fresh prompt (no memory of the earlier "
                 "ones). An empty line or Ctrl-D leaves; Ctrl-C "
                 "stops a generation. When stdin is not a terminal the lines come from "
                 "it, up to an empty line, each echoed before its continuation.")
def chat(s: Session, a: argparse.Namespace) -> None:
    model = s.resolve(a.model)
    s.osh.stat(model)  # ENOENT now rather than after the first line
    typed = sys.stdin.isatty()  # else the lines come from a script: echo them
    if typed:
        s.note(f"chat with {model}: each line is a prompt; an empty line or Ctrl-D leaves")
    history: list[dict[str, str]] | None = []  # None: the model has no chat template
    while True:
        line = read_line(s, "chat> ")
        if line is None or not line.strip():
            return
        echo = "" if typed else line
        try:
            if history is not None:
                turn = history + [{"role": "user", "content": line}]
                try:
                    said = generate(s, model, None, a, echo, messages=turn)["all"]
                    history = turn + [{"role": "assistant", "content": said}]
                    continue
                except SyscallError as e:
                    if e.errno != Errno.EINVAL or "chat template" not in e.message:
                        raise
                    history = None
            generate(s, model, line, a, echo=echo)
        except KeyboardInterrupt:  # it stopped that generation: the chat goes on
            pass
        except SyscallError as e:
            s.error(f"{e.errno.name}: {e.message}")
            s.status = 1


def model_line(r: dict[str, Any], verb: str) -> list[str]:
    """One summary line of an import or an export."""
    where = f"{r['dir']} from {r['path']}" if verb == "exported" else r["path"]
    lines = [f"{verb} {where}: {r['architecture']}, {r['files']} files, "
             f"{r['tensors']:,} tensors, {_views.size(r['bytes'])}"]
    if r.get("skipped"):
        lines.append(f"skipped: {', '.join(r['skipped'])}")
    return lines


MODEL_JSON = "{path, files, tensors, bytes, architecture, skipped}"


@command("import", "models", "store a Hugging Face model directory (config, safetensors "
         "weights, tokenizer) in tensorfs",
         arg("dir", metavar="DIR", complete="local",
             help="what save_pretrained writes: config.json, *.safetensors, tokenizer"),
         arg("path", metavar="PATH", complete="tensor", help="e.g. /models/NAME"),
         arg("--force", action="store_true", help="replace a model already at PATH"),
         arg("-m", "--mode", type=mode_arg, default="644", metavar="MODE",
             help="mode bits of every tensor, octal"),
         syscalls=("stat", "mkdir", "open_tensor", "write_tensor", "close_tensor",
                   "rename", "listdir", "unlink"),
         view=lambda r, s, a: model_line(r, "imported"), json_keys=MODEL_JSON,
         details="Everything is checked before anything is written: config.json names "
                 "a causal LM transformers knows, the weights are the ones it builds, "
                 "every safetensors file reads, the tokenizer loads. The model is "
                 "written as PATH.importing and renamed to PATH, so a failed or "
                 "interrupted import leaves nothing. Makes PATH's missing parents.")
def import_model(s: Session, a: argparse.Namespace) -> dict[str, Any]:
    with s.unbounded() as osh:
        return osh.import_model(a.dir, s.resolve(a.path), perm=a.mode, force=a.force)


@command("export", "models", "write a model from tensorfs as a Hugging Face model "
         "directory that from_pretrained loads",
         arg("path", metavar="PATH", complete="tensor",
             help="a model directory (its latest checkpoint) or a checkpoint"),
         arg("dir", metavar="DIR", complete="local", help="the directory to write"),
         arg("--force", action="store_true", help="replace DIR if it is not empty"),
         syscalls=("stat", "listdir", "open_tensor", "read_tensor", "close_tensor"),
         view=lambda r, s, a: model_line(r, "exported"),
         json_keys="{path (the checkpoint read), dir, files, tensors, bytes, "
                   "architecture, skipped}",
         details="DIR is written as DIR.partial and renamed when complete.")
def export_model(s: Session, a: argparse.Namespace) -> dict[str, Any]:
    with s.unbounded() as osh:
        return osh.export_model(s.resolve(a.path), a.dir, force=a.force)


@command("tokenizer", "models", "train a byte-level BPE tokenizer on a text dataset and "
         "store it in a tensorfs model directory",
         arg("action", metavar="ACTION", choices=["train"], help="train"),
         arg("dataset", metavar="DATASET", complete="tensor",
             help="a 1-D uint8 tensor of text (llmos corpus makes one)"),
         arg("path", metavar="PATH", complete="tensor",
             help="the directory to hold tokenizer.json (made when missing)"),
         arg("--vocab", type=int, default=4096, metavar="N", help="tokens in the vocabulary"),
         arg("--min-frequency", type=int, default=2, metavar="N",
             help="a pair merges only if it occurs at least N times"),
         arg("--force", action="store_true", help="replace a tokenizer PATH holds"),
         syscalls=("stat", "listdir", "mkdir", "open_tensor", "read_tensor", "close_tensor"),
         view=lambda r, s, a: [f"{r['path']}: a BPE tokenizer of {r['vocab']:,} tokens "
                               f"from {_views.size(r['bytes'])} of {r['dataset']} in "
                               f"{r['time_s']:.1f}s"],
         json_keys="{path, vocab, asked, dataset, bytes, files, time_s}",
         details="The tokenizer has <|pad|>, <|bos|> and <|eos|> (ids 0, 1, 2) and every "
                 "byte, so it encodes any text. spawn_train's arch= with tokenizer=PATH "
                 "trains a model that uses it.")
def tokenizer(s: Session, a: argparse.Namespace) -> dict[str, Any]:
    with s.unbounded() as osh:
        return osh.train_tokenizer(s.resolve(a.dataset), s.resolve(a.path), vocab=a.vocab,
                                   min_frequency=a.min_frequency, force=a.force)


shows("models", "models", "the models the executor holds loaded, and its batching "
      "statistics", lambda m, s: _views.models_lines(m),
      "models()'s record: {models: [{path, bytes, requests, step, loss, loaded_at, "
      "architecture, compression}], "
      "engine: {...}, budget, max_batch}")

