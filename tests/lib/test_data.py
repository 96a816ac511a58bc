"""Training data (`lib.data`): the bundled corpus and its split, local sources, packing into
blocks, the memory-mapped token cache, streaming, and bits per byte."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lib.data import (
    bundled_documents,
    clean_context,
    load_documents,
    prepare_data,
    prepare_streaming_data,
    split_documents,
    tokenize_and_pack,
)
from lib.tokenizer import train_tokenizer


def test_clean_context_drops_cut_words_and_fixes_punctuation():
    assert (
        clean_context("ло сказал он ,", " пошёл", " домой . Потом спа")
        == "сказал он, пошёл домой. Потом"
    )


def test_bundled_corpus_is_real_russian_and_split_is_deterministic():
    docs = bundled_documents()
    assert len(docs) > 5000 and 1_400_000 < sum(map(len, docs)) < 1_800_000
    train, val = split_documents(docs, 0.05)
    train2, val2 = split_documents(list(reversed(docs)), 0.05)
    assert set(val) == set(val2) and not set(train) & set(val)
    assert 0.03 < len(val) / len(docs) < 0.07


def test_local_txt_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("первая строка\n\nвторая строка\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        '{"text": "третья"}\n{"text": "четвёртая"}\n', encoding="utf-8"
    )
    assert load_documents(str(tmp_path)) == [
        "первая строка",
        "вторая строка",
        "третья",
        "четвёртая",
    ]
    (tmp_path / "bad.jsonl").write_text("not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_documents(str(tmp_path / "bad.jsonl"))


def test_packing_predicts_every_token_once():
    docs = bundled_documents()[:50]
    tok = train_tokenizer(docs, vocab_size=400)
    blocks = tokenize_and_pack(docs, tok, block_size=32)
    b = blocks.blocks
    assert b.shape[1] == 33
    assert torch.equal(b[:-1, -1], b[1:, 0])  # one-token overlap: no target skipped or repeated
    assert (b == tok.eos_token_id).any()


def test_token_cache_is_memory_mapped_and_keyed_by_tokenizer_and_data(tmp_path):
    docs = bundled_documents()[:80]
    tok = train_tokenizer(docs, vocab_size=400)
    first = tokenize_and_pack(docs, tok, block_size=32, cache_dir=tmp_path)
    files = list(tmp_path.glob("tokens-*.uint16"))
    assert len(files) == 1 and first.stream.dtype == np.uint16
    again = tokenize_and_pack(docs, tok, block_size=32, cache_dir=tmp_path)
    assert isinstance(again.stream, np.memmap) and torch.equal(again.blocks, first.blocks)
    assert torch.equal(
        again.blocks, tokenize_and_pack(docs, tok, block_size=32).blocks
    )  # same as uncached
    tokenize_and_pack(docs[:40], tok, block_size=32, cache_dir=tmp_path)  # other data, other key
    tokenize_and_pack(
        docs, train_tokenizer(docs, vocab_size=300), block_size=32, cache_dir=tmp_path
    )
    assert len(list(tmp_path.glob("tokens-*"))) == 3


def test_streaming_gives_the_same_blocks_as_loading(tmp_path):
    docs = bundled_documents()[:400]
    src = tmp_path / "corpus.jsonl"
    src.write_text(
        "\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs), encoding="utf-8"
    )
    tok = train_tokenizer(docs, vocab_size=400)
    loaded = prepare_data(str(src), tok, block_size=32, val_fraction=0.05)
    streamed, _, counts = prepare_streaming_data(str(src), tok, 32, 0.05, tmp_path / "cache")
    assert torch.equal(streamed.train.blocks, loaded.train.blocks)
    assert torch.equal(streamed.val.blocks, loaded.val.blocks)
    assert streamed.train.n_bytes == loaded.train.n_bytes and sum(counts) == len(docs)
    again, _, _ = prepare_streaming_data(
        str(src), tok, 32, 0.05, tmp_path / "cache"
    )  # cached: no second pass
    assert isinstance(again.train.stream, np.memmap)


def test_training_documents_that_contain_a_held_out_one_are_dropped():
    from lib.data import drop_overlapping

    heldout = ["Тише едешь — дальше будешь.", "Всё", "Ёлки-палки, лес густой!"]
    docs = [
        "Он сказал: «тише едешь, дальше будешь» и ушёл.",  # contains one: case, punctuation differ
        "Тише едешь, а дальше не будешь.",  # a word in between: kept
        "елки палки лес густой",  # ё and е are the same letter here
        "Всё было тихо.",  # "Всё" is shorter than three words: never matched
        "Дальше будешь тише едешь.",  # the same words in another order: kept
    ]
    assert drop_overlapping(docs, heldout) == [docs[1], docs[3], docs[4]]
    assert drop_overlapping(docs, []) == docs
