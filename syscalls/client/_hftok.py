"""Training a byte-level BPE tokenizer from a tensorfs text dataset, with the
`tokenizers` library (docs/executor.md, "Tokenizers"). Importing it costs only
the standard library: tokenizers and transformers load inside the calls. The
executor's training workers use text_pieces and the tests bpe_tokenizer.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from typing import Any

from syscalls import Errno, SyscallError

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")  # ids 0, 1, 2
MIN_VOCAB, MAX_VOCAB = 256 + len(SPECIALS) + 1, 1 << 20
FILES = ("tokenizer.json", "tokenizer_config.json")
MAX_INVALID = 0.01  # more bytes than this share that are not UTF-8: not text


def bpe_tokenizer(texts: Iterable[str], vocab: int, min_frequency: int = 2) -> Any:
    """A byte-level BPE tokenizer trained on texts, as a transformers
    PreTrainedTokenizerFast with <|pad|>, <|bos|> and <|eos|> (ids 0, 1, 2). Every
    byte is in its alphabet, so it encodes any text."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=min_frequency,
                                  show_progress=False, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[0],
                                   bos_token=SPECIALS[1], eos_token=SPECIALS[2])


def text_pieces(text: str, chunk: int = 1 << 16) -> Iterable[str]:
    """text in pieces of about chunk characters, cut after a newline."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + chunk)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def train_tokenizer(osh: Any, dataset: str, path: str, vocab: int = 4096,
                    min_frequency: int = 2, force: bool = False) -> dict[str, Any]:
    if isinstance(vocab, bool) or not isinstance(vocab, int) or \
            not MIN_VOCAB <= vocab <= MAX_VOCAB:
        raise SyscallError(Errno.EINVAL, f"tokenizer: vocab must be from {MIN_VOCAB} to "
                           f"{MAX_VOCAB}, got {vocab!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or \
            min_frequency < 1:
        raise SyscallError(Errno.EINVAL, f"tokenizer: min_frequency must be an int >= 1, "
                           f"got {min_frequency!r}")
    st = osh.stat(dataset)
    if st["type"] != "tensor" or st.get("dtype") != "uint8" or len(st.get("shape", [])) != 1:
        raise SyscallError(Errno.EINVAL, f"tokenizer: {dataset} must be a 1-D uint8 tensor "
                           f"of text (llmos corpus makes one), not a {st['type']} "
                           f"{st.get('dtype', '')} {st.get('shape', '')}".rstrip())
    try:
        have = {e["name"] for e in osh.listdir(path)}
    except SyscallError as e:
        if e.errno != Errno.ENOENT:
            raise
        have = set()
    if "tokenizer.json" in have and not force:
        raise SyscallError(Errno.EEXIST, f"tokenizer: {path} has a tokenizer.json already "
                           "(force=True, --force, replaces it)")
    import numpy as np
    t0 = time.monotonic()
    raw = np.asarray(osh.load_tensor(dataset), dtype=np.uint8).tobytes()
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        raise SyscallError(Errno.EINVAL, f"tokenizer: {dataset} holds no text")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > MAX_INVALID * len(raw):
        raise SyscallError(Errno.EINVAL, f"tokenizer: {dataset} is not text: {bad:,} of its "
                           f"{len(raw):,} bytes are not UTF-8")
    tok = bpe_tokenizer(text_pieces(text), vocab, min_frequency)
    from ._hfio import _makedirs
    _makedirs(osh, path)
    with tempfile.TemporaryDirectory(prefix="llmos-tok-") as tmp:
        tok.save_pretrained(tmp)
        for name in FILES:
            with open(os.path.join(tmp, name), "rb") as f:
                data = f.read()
            osh.save_tensor(f"{path}/{name}", np.frombuffer(data, dtype=np.uint8))
    return {"path": path, "vocab": len(tok), "asked": vocab, "dataset": dataset,
            "bytes": len(raw), "files": list(FILES),
            "time_s": round(time.monotonic() - t0, 3)}
