"""Requests are prepared off the event loop, and a prompt that cannot fit the context is refused
from its length before it is tokenized (issue 32, item 3: 64 prompts of 8,000 characters were
tokenized on the loop, then refused, and held /health for seconds)."""

from __future__ import annotations

import math
import random
import string
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, normalizers

from lib.inference import PromptTooLong
from lib.inference.prompts import check_may_fit
from lib.tokenizer import max_token_chars, train_char_tokenizer, wrap_tokenizer
from tests.helpers import app_with


class TokenizerSpy:
    """The real tokenizer, noting which thread encodes which text and renders which chat."""

    def __init__(self, tokenizer):
        self.__dict__.update(_tok=tokenizer, calls=[])

    def _note(self, what: str, size: int) -> None:
        self.calls.append((threading.current_thread().name, what, size))

    def __call__(self, text, *args, **kwargs):
        self._note("encode", len(text) if isinstance(text, str) else sum(map(len, text)))
        return self._tok(text, *args, **kwargs)

    def apply_chat_template(self, messages, *args, **kwargs):
        self._note("chat", sum(len(m["content"]) for m in messages))
        return self._tok.apply_chat_template(messages, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.fixture
def spy(service, monkeypatch) -> TokenizerSpy:
    watched = TokenizerSpy(service.tokenizer)
    monkeypatch.setattr(service, "tokenizer", watched)
    return watched


def latin_words(chars: int, seed: int = 0) -> str:
    """Made-up Latin words: about one token per character for the Russian tokenizer."""
    rng = random.Random(seed)
    words = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))))
    return " ".join(words)[:chars]


# -- the bound ----------------------------------------------------------------------------------
def test_no_text_encodes_to_fewer_tokens_than_its_length_allows(service):
    tok = service.tokenizer
    most = max_token_chars(tok)
    assert most == max(len(tok.decode([i])) for i in range(len(tok)))  # one token spans it all
    longest = next(i for i in range(len(tok)) if len(tok.decode([i])) == most)
    texts = [
        tok.decode([longest]) * 40,  # the bound's own case: as few tokens as it allows
        "Москва — столица России. " * 50,
        latin_words(3000),
        "<|endoftext|>" * 30,  # a special token the text spells out is one token
        "🙂 ёжик 12345 \n\t  " * 40,
        " " * 500,
    ]
    for text in texts:
        tokens = len(tok(text)["input_ids"])
        assert tokens >= math.ceil(len(text) / most), text[:40]
    assert len(tok(texts[0])["input_ids"]) == 40  # the bound is reached: L is not too small


def test_a_tokenizer_that_could_shrink_a_text_gives_no_bound():
    char_tok = train_char_tokenizer(["привет мир"])
    assert max_token_chars(char_tok) == len("<|endoftext|>")  # its longest: the special token
    text = "<|endoftext|>ж" * 20
    assert len(char_tok(text)["input_ids"]) >= math.ceil(len(text) / 13)
    nfc = Tokenizer(models.BPE(vocab={"a": 0, "é": 1}, merges=[]))
    nfc.normalizer = normalizers.NFC()  # "e" + U+0301 is one character after it: no bound
    assert max_token_chars(wrap_tokenizer(nfc)) is None
    check_may_fit(wrap_tokenizer(nfc), ["a" * 10_000], [1], 8)  # nothing refused unseen


def test_check_may_fit_refuses_by_length_and_passes_what_may_fit(service):
    tok, ctx = service.tokenizer, service.context_length
    most = max_token_chars(tok)
    check_may_fit(tok, ["а" * (most * (ctx - 1))], [1], ctx)  # might just fit: tokenize it
    with pytest.raises(PromptTooLong, match="characters is at least") as e:
        check_may_fit(tok, ["ok", "а" * (most * (ctx - 1) + 1)], [1, 1], ctx)
    assert e.value.index == 1


# -- the routes ---------------------------------------------------------------------------------
def refused_unseen(r, param: list[str], spy: TokenizerSpy, shape: str = "forward") -> None:
    """A 400 at `param` from the length check, and no text was tokenized."""
    assert r.status_code == 400, r.text
    if shape == "openai":
        error = r.json()["error"]
        assert error["param"] == ".".join(param) and "characters is at least" in error["message"]
    else:
        (error,) = r.json()["errors"]
        assert error["loc"] == param and "characters is at least" in error["msg"], error
    assert [c for c in spy.calls if c[1] == "encode"] == []


@pytest.fixture
def big_client(service, settings, spy):
    """The default limits: 64 texts of 8,000 characters, 14 characters at most per token."""
    app = app_with(service, settings, max_text_chars=8000, max_texts=64, max_file_bytes=8000)
    with TestClient(app, raise_server_exceptions=False) as c:
        spy.calls.clear()  # the warm-up's
        yield c


def test_what_cannot_fit_is_refused_before_tokenizing(big_client, spy):
    client, least = big_client, math.ceil(8000 / max_token_chars(spy))
    long = latin_words(8000)  # within the character limit, not the context
    many = [latin_words(8000, seed) for seed in range(64)]
    r = client.post("/v1/completions", json={"prompt": many, "max_tokens": 4})
    refused_unseen(r, ["prompt"], spy, "openai")
    expected = f"prompt 0: prompt of 8000 characters is at least {least} tokens"
    assert expected in r.json()["error"]["message"]
    chat = {"messages": [{"role": "user", "content": long[:7900]}], "max_tokens": 4}
    refused_unseen(client.post("/v1/chat/completions", json=chat), ["messages"], spy, "openai")
    assert [c[1] for c in spy.calls] == ["chat"]  # rendered (in the preparing thread), no more
    refused_unseen(client.post("/forward", json={"text": long}), ["text"], spy)
    r = client.post("/forward", files={"file": ("a.txt", long.encode())})
    refused_unseen(r, ["text"], spy)
    refused_unseen(client.post("/forward_batch", json={"texts": many}), ["texts", "0"], spy)


def test_requests_are_tokenized_off_the_event_loop(client, spy):
    one = {"max_new_tokens": 1, "temperature": 0}
    assert client.post("/forward", json={"text": "Москва", **one}).status_code == 200
    assert (
        client.post("/forward", data={"text": "Москва", "max_new_tokens": "1"}).status_code == 200
    )
    r = client.post("/forward_batch", json={"texts": ["Москва", "Киев"], **one})
    assert r.status_code == 200
    r = client.post("/v1/completions", json={"prompt": ["Москва", "Киев"], "max_tokens": 1})
    assert r.status_code == 200
    chat = {"messages": [{"role": "user", "content": "Привет"}], "max_tokens": 1}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    r = client.post("/v1/completions", json={"prompt": "Москва", "max_tokens": 1, "stream": True})
    assert r.status_code == 200
    kinds = [what for _, what, _ in spy.calls]
    assert kinds.count("encode") == 8 and kinds.count("chat") == 1, spy.calls
    assert {thread.split("_")[0] for thread, _, _ in spy.calls} == {"prepare"}, spy.calls


@pytest.mark.slow
def test_health_answers_while_huge_prompts_are_refused(live_server):
    """8 clients sending 64 prompts of 8,000 characters (512 KB) to /v1/completions and
    /forward_batch of a real server: all refused by their length, and /health keeps answering
    (before, each such request held the loop 0.2-0.5 s; bench/loop_block_bench.py times it)."""
    texts = [latin_words(8000, seed) for seed in range(64)]
    bodies = [
        ("/v1/completions", {"prompt": texts, "max_tokens": 16}),
        ("/forward_batch", {"texts": texts, "max_new_tokens": 16}),
    ]
    stop = threading.Event()

    def send(i: int) -> list[tuple[int, str]]:
        path, body = bodies[i % 2]
        answers = []
        with httpx.Client(base_url=live_server.url, timeout=60) as http:
            while not stop.is_set() or not answers:
                r = http.post(path, json=body)
                answers.append((r.status_code, r.text))
        return answers

    with ThreadPoolExecutor(8) as pool:
        load = [pool.submit(send, i) for i in range(8)]
        with httpx.Client(base_url=live_server.url, timeout=60) as http:
            # answered while the 8 clients are refused (how fast: bench/loop_block_bench.py)
            health = [http.get("/health").status_code for _ in range(40)]
        stop.set()
        answers = [a for f in load for a in f.result()]
    assert health == [200] * 40
    assert answers and all(code == 400 for code, _ in answers), answers[:3]
    assert all("characters is at least" in text for _, text in answers), answers[0]
