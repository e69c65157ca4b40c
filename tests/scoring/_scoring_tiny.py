"""A tiny causal LM built from a config (no download) with a character-level tokenizer, and small datasets."""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHARS = string.ascii_letters + string.digits + " .,?!'#:\n"


def tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def gpt2(seed: int = 0, layers: int = 3, dtype: torch.dtype = torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_embd=16, n_head=2, n_positions=128, vocab_size=len(CHARS) + 2,
                        bos_token_id=1, eos_token_id=1, pad_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "eager"
    config.architectures = ["GPT2LMHeadModel"]
    return GPT2LMHeadModel(config).to(dtype).eval()


def save_tiny_model(folder: Path) -> Path:
    gpt2().save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


RECORDS = [
    {"instruction": "what is two plus two?", "response": "four."},
    {"instruction": "name a colour.", "response": "blue, like the sky."},
    {"messages": [{"role": "user", "content": "hi!"}, {"role": "assistant", "content": "hello, how are you?"}]},
    {"instruction": "count to three", "input": "slowly", "output": "one, two, three."},
    {"prompt": "say yes", "completion": "yes"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"},
                  {"role": "assistant", "content": "because."}, {"role": "user", "content": "ok"},
                  {"role": "assistant", "content": "good 42"}]},
    {"instruction": "spell cat", "response": "c a t"},
]
