"""The tokenizers (`lib.tokenizer`): byte-level BPE and character-level, trained on the bundled
corpus, saved for `AutoTokenizer`, and the byte length of every token."""

from __future__ import annotations

from transformers import AutoTokenizer

from lib.data import bundled_documents
from lib.tokenizer import (
    load_tokenizer,
    token_byte_lengths,
    token_bytes,
    train_char_tokenizer,
    train_tokenizer,
)


def test_tokenizer_roundtrip_saves_for_autotokenizer(tmp_path):
    docs = bundled_documents()[:500]
    tok = train_tokenizer(docs, vocab_size=600)
    assert len(tok) == 600
    tok.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Привет, мир! Ёлка 2026 — ok"
    assert auto.decode(auto(text)["input_ids"]) == text
    assert auto.eos_token == "<|endoftext|>"
    # bits per byte needs the exact byte length of every token
    lengths = token_byte_lengths(load_tokenizer(tmp_path))
    assert sum(lengths[i] for i in auto(text)["input_ids"]) == len(text.encode())
    ids = auto(text)["input_ids"]
    assert b"".join(token_bytes(auto, i) for i in ids) == text.encode()


def test_char_tokenizer_is_one_token_per_character_with_bytes_for_the_rest(tmp_path):
    docs = bundled_documents()[:500]
    tok = train_char_tokenizer(docs)
    tok.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    seen = "Привет мир."
    ids = auto(seen)["input_ids"]
    assert auto.convert_ids_to_tokens(ids) == list(seen)
    # a character the corpus lacks is its UTF-8 bytes; every text round-trips
    text = "Привет 😀 мир<|endoftext|>Ёж"
    ids = auto(text)["input_ids"]
    assert auto.decode(ids) == text
    assert auto.convert_ids_to_tokens(ids)[7:11] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert auto.eos_token_id == 0 and ids.count(0) == 1
    # the vocabulary: end of text, 256 bytes, then the corpus's characters, most frequent first
    chars = set("".join(docs))
    assert len(auto) == 1 + 256 + len(chars)
    assert auto.convert_ids_to_tokens(257) == " "
    lengths = token_byte_lengths(load_tokenizer(tmp_path))
    assert sum(lengths[i] for i in ids) == len(text.encode()) - len("<|endoftext|>")
    assert lengths[auto.convert_tokens_to_ids("ж")] == 2 and lengths[0] == 0
    # what the OpenAI routes' logprobs show for a token: its bytes, a special token as its name
    assert token_bytes(auto, auto.convert_tokens_to_ids("<0xF0>")) == b"\xf0"
    assert token_bytes(auto, auto.convert_tokens_to_ids("ж")) == "ж".encode()
    assert token_bytes(auto, 0) == b"<|endoftext|>"
