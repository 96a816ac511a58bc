"""LoRA adapters over the served model (lib/inference/adapters.py): loading and its checks, and the
decoder's per-row updates against `peft` itself, with the real committed model."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lib.inference import EngineSpec, GenerationParams, LoadSpec
from lib.inference.adapters import AdapterBank, AdapterError, AdapterNotFound
from lib.inference.decoder import GPT2SlotDecoder
from lib.inference.engine import GenerationEngine
from lib.inference.engine_process.client import EngineProcess
from lib.inference.prompts import encode_prompts
from tests.helpers import CHECKPOINT, until

PROMPTS = ["Привет, мир!", "Москва — столица", "Он открыл дверь и"]


def make_adapter(path, seed: int, rank: int = 4, targets=("c_attn", "c_proj", "c_fc")):
    """A PEFT LoRA directory made by peft itself, with random (nonzero) A and B."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(CHECKPOINT)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(targets),
        fan_in_fan_out=True,
        init_lora_weights=False,  # random B too: the adapter changes the model
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a nudge, as training gives, not noise that swamps the model
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(root / "a", 1),
        "b": make_adapter(root / "b", 2, rank=8, targets=("c_attn",)),
        "c": make_adapter(root / "c", 3, rank=2, targets=("c_fc", "c_proj")),
    }


@pytest.fixture(scope="module")
def base():
    return AutoModelForCausalLM.from_pretrained(CHECKPOINT).eval()


def peft_logits(path, ids: list[int]) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(CHECKPOINT), path)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0]


def test_rows_with_different_adapters_share_a_step_and_equal_peft(service, base, adapters):
    """One prefill and two decode steps of four rows: three adapters and the base model in one
    batch, each row's logits equal to peft's for its own adapter (and the base row's to the
    plain model's)."""
    bank = AdapterBank(base, 64 << 20)
    for name, path in adapters.items():
        bank.add(name, path)
    names = ["a", None, "b", "c"]
    ids = encode_prompts(service.tokenizer, PROMPTS[:1] * 4)[0]
    dec = GPT2SlotDecoder(base)
    dec.reserve(4, len(ids) + 4)
    lora = bank.rows(names)
    got = [dec.prefill([ids] * 4, 0, lora=lora)]
    seq = list(ids)
    for token in (17, 99):
        got.append(dec.decode(torch.tensor([token] * 4), [len(seq)] * 4, lora=lora))
        seq.append(token)
    for i, name in enumerate(names):
        if name is None:
            with torch.no_grad():
                want = base(torch.tensor([seq])).logits[0]
        else:
            want = peft_logits(adapters[name], seq)
        for step, logits in enumerate(got):
            position = len(ids) - 1 + step
            assert torch.allclose(logits[i], want[position], atol=2e-4), (name, step)
    with torch.no_grad():
        plain = base(torch.tensor([seq])).logits[0]
    assert (got[0][0] - plain[len(ids) - 1]).abs().max() > 0.01  # the adapter changes the model


def test_a_base_row_beside_adapter_rows_is_exactly_the_base_model(service, base, adapters):
    """Its numbers do not depend on its neighbours' adapters (while adapters are loaded the MLP
    runs unfused for every row: decoder.unfused_mlp), and they are the base model's."""
    bank = AdapterBank(base, 64 << 20)
    bank.add("a", adapters["a"])
    ids = encode_prompts(service.tokenizer, PROMPTS)
    dec = GPT2SlotDecoder(base)
    dec.reserve(3, 32)
    fused = dec.prefill(ids, 0)
    dec.unfused_mlp = True
    alone = dec.prefill(ids, 0)
    mixed = dec.prefill(ids, 0, lora=bank.rows(["a", None, "a"]))
    assert torch.equal(mixed[1], alone[1])
    assert torch.allclose(alone, fused, atol=1e-4)


def test_no_adapter_rows_means_no_update(base, adapters):
    bank = AdapterBank(base, 64 << 20)
    bank.add("a", adapters["a"])
    assert bank.rows([None, None]) is None


def broken_copy(src, dst, change):
    shutil.copytree(src, dst)
    change(dst)
    return dst


def test_bad_adapters_are_refused_with_the_reason(base, adapters, tmp_path):
    bank = AdapterBank(base, 64 << 20, base_sha256="a" * 64)

    def config(path, **changes):
        c = json.loads((path / "adapter_config.json").read_text())
        c.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(c))

    def card(path):
        (path / "training_card.json").write_text(json.dumps({"base": {"sha256": "b" * 64}}))

    cases = {
        "missing": (lambda p: (p / "adapter_model.safetensors").unlink(), "has no"),
        "corrupt": (
            lambda p: (p / "adapter_model.safetensors").write_bytes(b"not a safetensors file"),
            "not readable",
        ),
        "rank": (lambda p: config(p, r=5), "do not fit"),
        "dora": (lambda p: config(p, use_dora=True), "use_dora"),
        "kind": (lambda p: config(p, peft_type="PREFIX_TUNING"), "not LORA"),
        "base": (card, "trained on the checkpoint"),
    }
    for name, (change, reason) in cases.items():
        path = broken_copy(adapters["a"], tmp_path / name, change)
        with pytest.raises(AdapterError, match=reason):
            bank.add(name, path)
    with pytest.raises(AdapterError, match="adapter name"):
        bank.add("no/slashes", adapters["a"])
    assert bank.adapters == {}  # nothing half-loaded


def test_the_budget_unloads_the_least_recently_used_idle_adapter(base, adapters):
    sizes = AdapterBank(base, 64 << 20)
    size = {name: sizes.add(name, path).nbytes for name, path in adapters.items()}
    bank = AdapterBank(base, size["a"] + max(size["b"], size["c"]))  # room for two: "a" and one
    bank.add("a", adapters["a"])
    bank.add("c", adapters["c"])
    bank.get("a")  # "c" is now the least recently used
    bank.add("b", adapters["b"])
    assert list(bank.adapters) == ["a", "b"]
    bank.in_use["a"] = 1
    bank.in_use["b"] = 1
    with pytest.raises(AdapterError, match="in use"):
        bank.add("c", adapters["c"])
    with pytest.raises(AdapterNotFound):
        bank.get("c")


# -- the engines ----------------------------------------------------------------------------------
GREEDY = GenerationParams(max_new_tokens=12, temperature=0)
SEEDED = GenerationParams(max_new_tokens=12, temperature=0.9, seed=5)


def mixed_requests(service):
    """16 requests over the base model and three adapters, greedy and seeded."""
    names = [None, "a", "b", "c"]
    return [
        service.prepare(
            PROMPTS[i % 3],
            dataclasses.replace(GREEDY if i % 2 else SEEDED, adapter=names[i % 4]),
        )
        for i in range(16)
    ]


@pytest.mark.parametrize("engine_kind", ["thread", "process"])
def test_sixteen_requests_over_three_adapters_equal_each_alone(service, adapters, engine_kind):
    """One engine, the base model and three adapters: 16 requests at once give each the text it
    gives alone, and an adapter changes the text (against the base model's)."""
    spec = EngineSpec(
        load=LoadSpec(checkpoint=str(CHECKPOINT)),
        adapters=tuple((n, str(p)) for n, p in adapters.items()),
    )
    if engine_kind == "thread":
        engine = GenerationEngine.create(spec, model=service)
    else:
        engine = EngineProcess(dataclasses.replace(spec, standby=False))
    engine.start()
    try:
        assert {a["name"] for a in engine.list_adapters()} == {"a", "b", "c"}
        requests = mixed_requests(service)

        async def alone():
            return [(await engine.submit(r)).text for r in requests]

        async def together():
            return [r.text for r in await asyncio.gather(*map(engine.submit, requests))]

        want = asyncio.run(alone())
        assert asyncio.run(together()) == want
        by_adapter = {
            r.params.adapter: t
            for r, t in zip(requests, want, strict=True)
            if r.params.temperature == 0
        }
        assert len(set(by_adapter.values())) > 1  # the adapters change the text
    finally:
        engine.stop(5)


def test_adding_and_removing_adapters_on_a_running_engine(service, adapters):
    """Added at run time, listed, used; a removal waits for the requests running with it and new
    ones are refused at once; an unknown or a broken one is refused with the reason."""
    engine = service.create_engine()
    engine.start()
    try:
        described = engine.add_adapter("a", str(adapters["a"]))
        assert described["name"] == "a" and described["rank"] == 4
        long = dataclasses.replace(GREEDY, adapter="a", max_new_tokens=200, min_new_tokens=200)

        async def body():
            running = asyncio.ensure_future(engine.submit(service.prepare("Москва", long)))
            await until(lambda: engine.running == 1, "the request runs")
            await asyncio.to_thread(engine.remove_adapter, "a")
            listed = engine.list_adapters()
            refused = None
            try:
                await engine.submit(service.prepare("Москва", long))
            except AdapterNotFound as e:
                refused = e
            done = await running
            return listed, refused, done

        listed, refused, done = asyncio.run(body())
        assert listed == [dict(listed[0], name="a", running=1, removing=True)]
        assert isinstance(refused, AdapterNotFound)
        assert done.completion_tokens == 200  # the running one finished with its adapter
        assert engine.list_adapters() == []  # and then it was unloaded
        with pytest.raises(AdapterNotFound):
            engine.remove_adapter("a")
        with pytest.raises(AdapterError, match="has no"):
            engine.add_adapter("nothing", "/nonexistent")
    finally:
        engine.stop(5)
