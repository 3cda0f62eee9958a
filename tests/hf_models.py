"""Tiny Hugging Face model directories for the tests, built here: never downloaded.

    make_hf_dir(dst, family="llama") -> dst

writes what `save_pretrained` writes for a random-init causal LM of the family
(gpt2, llama or qwen2: 2 layers, width 64, context 256) and a byte-level BPE
tokenizer trained in the test with the `tokenizers` library on a fixed text
(vocabulary 384, with <|bos|>, <|eos|>, <|pad|> and a chat template unless
chat_template=False). The same arguments give the same bytes every run.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

FAMILIES = ("gpt2", "llama", "qwen2")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

TEXT = """def add(a, b):
    return a + b

class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def norm(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5

for i in range(10):
    print(i, add(i, i))
""" * 20


def make_tokenizer(chat_template: bool = True, vocab: int = 384):
    """A byte-level BPE tokenizer (PreTrainedTokenizerFast) trained on TEXT, as
    `llmos tokenizer train` trains one."""
    from syscalls.client import bpe_tokenizer
    fast = bpe_tokenizer(TEXT.splitlines(keepends=True), vocab, min_frequency=0)
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config(family: str, vocab: int, **over):
    """A 2-layer, width-64 config of the family, context 256."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        kw = dict(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids)
        return GPT2Config(**{**kw, **over})
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=False, **ids)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    return cls(**{**kw, **over})


def make_hf_dir(dst: Path | str, family: str = "llama", dtype: str = "float32",
                chat_template: bool = True, seed: int = 0, **config) -> Path:
    """Write a tiny random-init model of `family` and its tokenizer into dst."""
    import torch
    from transformers import AutoModelForCausalLM
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(chat_template)
    cfg = make_config(family, len(tok), **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst
