"""Grammar engines for structured outputs (issue 33), measured before choosing one: the time to
compile a JSON schema against a tokenizer, and the time to compute the allowed-token mask per
decode step for 1 and 16 rows, with our 4,096-token vocabulary and with GPT-2's 50,257.

Each row walks a valid JSON document token by token (the document's own tokenization): at each
step the engine fills the row's bitmask of allowed tokens, then accepts the next token. The
figure is the mean time of one step's masks (all rows, one after another, as the engine's step
would ask for them), best of `--repeats`.

It runs in a venv of its own (none of these is a dependency of the product yet):

    python -m venv .venv-grammar
    .venv-grammar/bin/pip install xgrammar llguidance transformers
    .venv-grammar/bin/python bench/grammar_bench.py --gpt2-tokenizer DIR

`--gpt2-tokenizer`: a directory with GPT-2's tokenizer.json (no hub here: one way is to convert
llama.cpp's `models/ggml-vocab-gpt-2.gguf`, shipped in llama-cpp-python's sdist, with
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` and `save_pretrained`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"enum": ["Москва", "Казань", "Новосибирск"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Анна Петрова", "age": 31, "city": "Казань", "tags": ["чай", "книги", "лес"]}


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int):
        import xgrammar as xgr

        self.xgr, self.vocab = xgr, vocab
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(info)

    def compile(self, schema: str):
        return self.compiler.compile_json_schema(schema)

    def matchers(self, compiled, rows: int):
        return [self.xgr.GrammarMatcher(compiled) for _ in range(rows)]

    def bitmask(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, self.vocab)

    def fill(self, matcher, bitmask, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.numpy as lnp

        self.ll, self.lnp = llguidance, lnp
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, schema: str):
        return self.ll.LLMatcher.grammar_from_json_schema(schema)

    def matchers(self, grammar, rows: int):
        out = [self.ll.LLMatcher(self.tok, grammar) for _ in range(rows)]
        for m in out:
            if m.is_error():
                raise RuntimeError(m.get_error())
        return out

    def bitmask(self, rows: int):
        return self.lnp.allocate_token_bitmask(rows, self.vocab)

    def fill(self, matcher, bitmask, row: int) -> None:
        self.lnp.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


ENGINES = {"xgrammar": XGrammar, "llguidance": LLGuidance}


def allowed(bitmask, row: int, token: int) -> bool:
    word = int(np.asarray(bitmask)[row, token // 32]) & 0xFFFFFFFF
    return bool((word >> (token % 32)) & 1)


def measure(engine_cls, tokenizer, vocab: int, rows: int, repeats: int) -> dict:
    schema = json.dumps(SCHEMA, ensure_ascii=False)
    t0 = time.perf_counter()
    engine = engine_cls(tokenizer, vocab)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = engine.compile(schema)
    engine.matchers(compiled, 1)  # llguidance builds its parser here, not in compile
    compile_s = time.perf_counter() - t0
    ids = tokenizer.encode(json.dumps(DOCUMENT, ensure_ascii=False), add_special_tokens=False)
    best = float("inf")
    for _ in range(repeats):
        matchers, bitmask = engine.matchers(compiled, rows), engine.bitmask(rows)
        times, first = [], None
        for token in ids:
            t0 = time.perf_counter()
            for row, m in enumerate(matchers):
                engine.fill(m, bitmask, row)
            times.append(time.perf_counter() - t0)
            if first is None:  # a mask that masks: only a JSON object's start is allowed
                first = sum(allowed(bitmask, 0, t) for t in range(vocab))
            if not allowed(bitmask, 0, token):
                raise AssertionError(f"{engine.name} masked a token of a valid document: {token}")
            for m in matchers:
                if not engine.accept(m, token):
                    raise AssertionError(f"{engine.name} refused token {token}")
        best = min(best, statistics.mean(times))
    return {
        "engine": engine.name,
        "vocab": vocab,
        "rows": rows,
        "tokenizer_setup_s": setup_s,
        "compile_s": compile_s,
        "mask_ms_per_step": best * 1e3,
        "steps": len(ids),
        "allowed_first": first,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ours", type=Path, default=ROOT / "models" / "default")
    p.add_argument("--gpt2-tokenizer", type=Path, help="a directory with GPT-2's tokenizer.json")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    tokenizers = [("ours", AutoTokenizer.from_pretrained(args.ours))]
    if args.gpt2_tokenizer:
        tokenizers.append(("gpt2", AutoTokenizer.from_pretrained(args.gpt2_tokenizer)))
    print(
        "| engine | vocabulary | rows | tokenizer setup (s) | schema compile (s) "
        "| mask per step (ms) | tokens allowed first |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, tok in tokenizers:
        vocab = len(tok)
        for name in args.engines:
            for rows in args.rows:
                r = measure(ENGINES[name], tok, vocab, rows, args.repeats)
                print(
                    f"| {name} | {label} ({vocab:,}) | {rows} | {r['tokenizer_setup_s']:.2f} "
                    f"| {r['compile_s']:.3f} | {r['mask_ms_per_step']:.3f} "
                    f"| {r['allowed_first']:,} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
