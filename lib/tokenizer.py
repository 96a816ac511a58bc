"""Byte-level BPE tokenizer, trained with `tokenizers`, saved in Hugging Face format.

The saved directory loads with `transformers.AutoTokenizer.from_pretrained(dir)`, no project code.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lib.config import EOS_TOKEN


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with one special token, `<|endoftext|>` (BOS/EOS/pad)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=1 << 30,
    )
    # left: for callers who batch prompts through transformers' own `generate` (a decoder-only model
    # needs its prompts to end in the same column); our engine and scorer never pad through here
    fast.padding_side = "left"
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """UTF-8 byte length of every token id (0 for special tokens), for bits-per-byte."""
    lengths = [0] * len(tokenizer)
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    for token, idx in tokenizer.get_vocab().items():
        if idx in special or idx >= len(lengths):
            continue
        lengths[idx] = sum(1 for ch in token if ch in byte_decoder)
    return lengths


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map used by byte-level BPE (GPT-2)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))
