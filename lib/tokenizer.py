"""Tokenizers trained with `tokenizers`, saved in Hugging Face format: byte-level BPE (the default)
and character-level (one token per character of the training text, UTF-8 bytes for any other).

The saved directory loads with `transformers.AutoTokenizer.from_pretrained(dir)`, no project code.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lib.presets import EOS_TOKEN


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


def train_char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: `<|endoftext|>`, the 256 bytes as `<0xXX>` tokens, then every
    character of the texts, most frequent first. A character the texts lack is encoded as its UTF-8
    bytes (byte fallback), so any text round-trips; decoding fuses the bytes back."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    vocab = {EOS_TOKEN: 0} | {f"<0x{b:02X}>": 1 + b for b in range(256)}
    for ch, _ in counts.most_common():
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([EOS_TOKEN])
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


def is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer writes each byte as one printable character (GPT-2's byte-level BPE,
    ours): read once from its `tokenizers` spec and remembered on the tokenizer."""
    known = getattr(tokenizer, "_ml_byte_level", None)
    if known is None:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        known = (spec.get("decoder") or {}).get("type") == "ByteLevel"
        tokenizer._ml_byte_level = known
    return known


def max_token_chars(tokenizer) -> int | None:
    """The most characters of a text that one token can stand for, L (read once from the
    tokenizer's `tokenizers` spec and remembered on it): a text of N characters then encodes to at
    least ceil(N / L) tokens, which refuses a prompt too long for a context before tokenizing it.

    A token stands for at most as many characters as its text starts (a byte-level token's bytes
    that are not UTF-8 continuation bytes; a byte-fallback token, one); an added token (the
    `<|endoftext|>` a text may contain) for its own text. None, no bound, when the pipeline could
    make a text shorter before it is split or let one token absorb any number of characters: a
    normalizer (NFC composes two characters into one), a model other than BPE (WordPiece's unknown
    word), fused unknown characters, or an added token that strips the spaces beside it."""
    known = getattr(tokenizer, "_ml_max_token_chars", False)
    if known is not False:
        return known
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, added = spec.get("model") or {}, spec.get("added_tokens") or []
    bounded = (
        spec.get("normalizer") is None
        and model.get("type") == "BPE"
        and not model.get("fuse_unk")
        and not any(a.get("lstrip") or a.get("rstrip") for a in added)
    )
    known = None
    if bounded:
        byte_level = is_byte_level(tokenizer)
        longest = max((_chars_started(piece, byte_level) for piece in model["vocab"]), default=1)
        known = max([longest, 1, *(len(a["content"]) for a in added)])
    tokenizer._ml_max_token_chars = known
    return known


def _chars_started(piece: str, byte_level: bool) -> int:
    """How many characters of a text the vocabulary entry `piece` can start."""
    if byte_level:  # each character stands for a byte; 0b10xxxxxx continues a character
        return sum(1 for ch in piece if _BYTE_OF_CHAR.get(ch, 0) & 0xC0 != 0x80)
    if _BYTE_TOKEN.fullmatch(piece):
        return 1
    return len(piece)


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The UTF-8 bytes one token stands for. A byte-level token's characters each stand for one
    byte; a byte-fallback token `<0xXX>` is that byte; a special token (`<|endoftext|>`) and any
    other token (a character-level one) are their own text."""
    piece = tokenizer.convert_ids_to_tokens(token_id) or ""
    if token_id in tokenizer.all_special_ids:
        return piece.encode()
    if is_byte_level(tokenizer):
        return bytes(_BYTE_OF_CHAR[ch] for ch in piece if ch in _BYTE_OF_CHAR)
    if _BYTE_TOKEN.fullmatch(piece):
        return bytes([int(piece[3:5], 16)])
    return piece.encode()


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """UTF-8 byte length of every token id (0 for special tokens), for bits-per-byte."""
    lengths = [0] * len(tokenizer)
    special = set(tokenizer.all_special_ids)
    for idx in tokenizer.get_vocab().values():
        if idx < len(lengths) and idx not in special:
            lengths[idx] = len(token_bytes(tokenizer, idx))
    return lengths


_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


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


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}
