"""LoRA adapters over the served model (lib/inference/adapters.py): loading and its checks, and the
decoder's per-row updates against `peft` itself, with the real committed model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lib.inference.adapters import AdapterBank, AdapterError, AdapterNotFound
from lib.inference.decoder import GPT2SlotDecoder
from lib.inference.prompts import encode_prompts
from tests.helpers import CHECKPOINT

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
    bank = AdapterBank(base, 64 << 20)
    bank.add("a", adapters["a"])
    ids = encode_prompts(service.tokenizer, PROMPTS)
    dec = GPT2SlotDecoder(base)
    dec.reserve(3, 32)
    alone = dec.prefill(ids, 0)
    mixed = dec.prefill(ids, 0, lora=bank.rows(["a", None, "a"]))
    assert torch.equal(mixed[1], alone[1])


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
