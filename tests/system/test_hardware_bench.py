"""bench/hardware_bench.py runs (tiny sizes, the default model), and the decoder's oneDNN weight
copies give the plain weights' logits. Nothing here asserts a speed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench import hardware_bench as hb
from lib.inference import decoder as decoder_module
from lib.inference.decoder import GPT2SlotDecoder
from lib.inference.prompts import encode_prompts
from tests.helpers import CHECKPOINT


def test_machine_measurements_are_positive():
    assert hb.memory_bandwidth(mib=8, repeats=1) > 0
    assert hb.matmul_peak(n=64, repeats=1) > 0


def test_step_accounting(service):
    model = service.model
    params = sum(p.numel() for p in model.parameters())
    wpe = model.transformer.wpe.weight
    # tied output projection counted once, position embeddings not at all
    assert hb.weight_bytes(model) == (params - wpe.numel()) * 4
    one, two = hb.step_flops(model, 1, 10), hb.step_flops(model, 2, 10)
    assert two == 2 * one
    assert one > 2 * model.lm_head.weight.numel()


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_the_table_is_measured_and_written(service, tmp_path, quantization):
    args = SimpleNamespace(
        quantization=quantization,
        checkpoint=str(CHECKPOINT),
        rows=[1, 2],
        threads=[torch.get_num_threads()],
        repeats=1,
        max_new_tokens=2,
        no_prepack=False,
    )
    intro, rows = hb.measure(args)
    assert len(rows) == 2 and all(r["ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert all(0 < r["products_ms"] for r in rows)
    table = hb.table(rows)
    assert table.count("\n") == 3 and "GFLOP/s" in intro and "step / products" in table
    assert ("int8" in intro) == (quantization == "int8")
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# B\n\n## Other\n\ntext\n", encoding="utf-8")
    hb.write_section(doc, "first")
    hb.write_section(doc, "second\n\n" + table)
    text = doc.read_text(encoding="utf-8")
    assert text.count(hb.SECTION) == 1 and "first" not in text and "second" in text
    assert text.startswith("# B\n\n## Other\n\ntext\n")
    doc.write_text(f"{hb.SECTION}\n\nold\n\n### Next\n\nkept\n", encoding="utf-8")
    hb.write_section(doc, "new")
    assert doc.read_text(encoding="utf-8") == f"{hb.SECTION}\n\nnew\n\n### Next\n\nkept\n"


@pytest.mark.skipif(decoder_module.onednn_reorder() is None, reason="no oneDNN weight reorder")
def test_reordered_weights_give_the_plain_weights_logits(service):
    """oneDNN on its own copies of the weights (the default) and on the plain ones: the same
    fp32 products up to the order of additions."""
    prompts = encode_prompts(service.tokenizer, ["Привет, мир!", "Москва — столица"])
    packed, plain = (GPT2SlotDecoder(service.model, prepack=p) for p in (True, False))
    assert packed.packed and packed.library == "onednn"
    assert not plain.packed and plain.library == "onednn"
    with torch.inference_mode():
        a, b = packed.prefill(prompts, 0), plain.prefill(prompts, 0)
        assert torch.allclose(a, b, atol=1e-4)
        ids = a.argmax(-1)
        pos = [len(p) for p in prompts]
        assert torch.allclose(packed.decode(ids, pos), plain.decode(ids, pos), atol=1e-4)
