"""The byte-level BPE tokenizer (`lib.tokenizer`): trained on the bundled corpus, saved for
`AutoTokenizer`, and the byte length of every token."""

from __future__ import annotations

from transformers import AutoTokenizer

from lib.data import bundled_documents
from lib.tokenizer import load_tokenizer, token_byte_lengths, train_tokenizer


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
