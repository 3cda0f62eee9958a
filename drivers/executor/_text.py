"""Text in and out of a model's tokens: the byte-level GPT's (UTF-8 bytes) and a
Hugging Face model's (its own tokenizer). Used by the executor driver on its
background thread (encode) and its loop thread (Detokenizer, StopFilter).
"""
from __future__ import annotations

import codecs
from typing import Any

from syscalls import Errno, SyscallError


def encode(tok: Any, prompt: str | None, messages: list[dict] | None, block_size: int,
           truncate: bool, path: str) -> list[int]:
    """The prompt's tokens: tok None is the byte-level GPT (UTF-8 bytes, no chat
    template). EINVAL: neither or both of prompt and messages, an empty prompt,
    messages to a model with no chat template, a prompt longer than the context
    unless truncate (then its last block_size - 1 tokens)."""
    if (prompt is None) == (messages is None):
        raise SyscallError(Errno.EINVAL, "infer: give either prompt or messages")
    if messages is not None:
        if not messages:
            raise SyscallError(Errno.EINVAL, "infer: messages is empty")
        if tok is None or not getattr(tok, "chat_template", None):
            raise SyscallError(Errno.EINVAL, f"infer: {path} has no chat template; "
                               "give a prompt instead of messages")
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # a template error: jinja's, or the template's raise_exception
            raise SyscallError(Errno.EINVAL, f"infer: {path}'s chat template failed: "
                               f"{type(e).__name__}: {e}") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        ids = [int(i) for i in ids]
    elif tok is None:
        ids = list(prompt.encode("utf-8", errors="surrogatepass"))  # type: ignore[union-attr]
    else:
        ids = [int(i) for i in tok(prompt, add_special_tokens=True)["input_ids"]]
    if not ids:
        raise SyscallError(Errno.EINVAL, "infer: the prompt is empty")
    room = block_size - 1
    if tok is not None and len(ids) > room:
        if not truncate:
            raise SyscallError(Errno.EINVAL, f"infer: the prompt is {len(ids)} tokens; "
                               f"{path} reads {block_size} at most, {room} with the first "
                               "new one (truncate=True keeps the last ones)")
        ids = ids[-room:]
    return ids


class Detokenizer:
    """New text from new tokens, incrementally: never a half character (UTF-8
    bytes of the byte GPT; a tokenizer's byte-level pieces), special tokens
    (eos) left out. For a tokenizer, decodes a short window of the latest tokens
    each time (as vLLM does), not the whole text."""

    def __init__(self, tok: Any = None) -> None:
        self.tok = tok
        self.bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def feed(self, tokens: list[int], final: bool = False) -> str:
        if self.tok is None:
            return self.bytes.decode(bytes(t & 0xFF for t in tokens), final=final)
        self.ids += tokens
        decode = self.tok.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class StopFilter:
    """Holds back text that may be the start of a stop string; cut() finds one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def push(self, text: str, final: bool) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was met: then text ends before it)."""
        if not self.stops:
            return text, False
        self.buf += text
        at = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if at >= 0:
            out, self.buf = self.buf[:at], ""
            return out, True
        if final:
            out, self.buf = self.buf, ""
            return out, False
        cut = len(self.buf) - self.hold
        out, self.buf = self.buf[:max(cut, 0)], self.buf[max(cut, 0):]
        return out, False
