"""The end of a LoRA run: OUTPUT_DIR/final as a PEFT adapter directory (adapter_config.json,
adapter_model.safetensors, training_card.json, README.md) or, with `--merge`, as a full
checkpoint with the adapter merged into the base's weights (written by the checkpoint writer of
full training, so plain transformers loads it and the service serves it). Both are written
atomically: into a temporary sibling directory, then renamed into place.

In every mode rank 0 rebuilds the adapted model from the gathered state (the base from
--init-from, peft's wrapper, the trained weights), so one path serves one process, DDP, FSDP and
DeepSpeed alike.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig

from lib.checkpoint import CARD_FILE, install_directory, load_model, save_checkpoint
from lib.export_onnx import export_onnx
from lib.training.artifacts import TrainingArtifacts
from lib.training.card import default_generation_config, rounded, run_facts
from lib.training.distributed import full_model_state
from lib.training.evaluation import heldout_figures
from lib.training.lora import adapt
from lib.training.lora_checks import lora_targets

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export_lora(a: TrainingArtifacts, final: dict, wall: float, say: Callable[..., None]) -> Path:
    """OUTPUT_DIR/final: the adapter (or the merged checkpoint) with its card, written by rank 0
    after the state is gathered (a collective); every rank returns its path."""
    cfg = a.config
    state = full_model_state(a.model, a.ctx)
    out = Path(cfg.output_dir) / "final"
    if a.ctx.is_main:
        model = adapted_model(a, state)
        card = lora_card(a, final, wall)
        say(
            f"held-out bits/byte: base {card['base_val_bits_per_byte']:.4f}, adapted "
            f"{card['val_bits_per_byte']:.4f} ({card['val_bits_per_byte_change']:+.4f})"
        )
        if cfg.merge:
            merged = model.merge_and_unload()
            save_checkpoint(
                merged,
                a.tokenizer,
                out,
                card,
                generation_config=base_generation_config(cfg.init_from, a.tokenizer),
                readme=render_lora_card(card),
            )
            say(f"merged checkpoint (base + adapter) written to {out}")
            if cfg.export_onnx:
                export_onnx(out, int8=cfg.export_onnx == "int8", python=cfg.onnx_exporter_python)
                say(f"ONNX export written to {out / 'onnx'}")
        else:
            save_adapter(model, out, card)
            say(f"adapter written to {out}")
    a.ctx.barrier()
    return out


def adapted_model(a: TrainingArtifacts, state: dict) -> torch.nn.Module:
    """The trained adapter on a fresh copy of the base, on the CPU, in eval mode."""
    model = adapt(load_model(a.config.init_from), a.config)
    model.load_state_dict(state)
    return model.eval()


def base_generation_config(base: str, tokenizer) -> GenerationConfig:
    """The base's generation defaults, kept by the merged checkpoint (training's, if it has none)."""
    if (Path(base) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(base)
    return default_generation_config(tokenizer.eos_token_id)


def save_adapter(model: torch.nn.Module, out: Path, card: dict) -> Path:
    """peft's `save_pretrained` (adapter_config.json + adapter_model.safetensors), the card and
    its README, into a temporary sibling of `out`, then renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        missing = [f for f in ADAPTER_FILES if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"peft's save_pretrained wrote no {', '.join(missing)}")
        (tmp / CARD_FILE).write_text(
            json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        (tmp / "README.md").write_text(render_lora_card(card), encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # safetensors writes its file private (0600): readable as any
            f.chmod(0o666 & ~umask)
        install_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def lora_card(a: TrainingArtifacts, final: dict, wall: float) -> dict:
    """The run's training card: the base and its content hash, the data and its hash, the
    adapter's settings, steps and tokens, and bits/byte on the held-out text before (the base)
    and after (base + adapter). Its top-level figures are those of a full run's card, so a merged
    checkpoint's /metadata shows them."""
    import peft

    cfg, st, lora = a.config, a.state, a.lora
    before, heldout_before = lora.before, heldout_figures(lora.before)
    return {
        "model_id": cfg.run_name or Path(cfg.output_dir).name,
        "kind": "merged" if cfg.merge else "lora_adapter",
        "base": {
            "path": lora.path,
            "sha256": lora.sha256,
            "weights_sha256": lora.weights_sha256,
            "model_id": lora.model_id,
            "parameters": lora.base_parameters,
        },
        "lora": {
            "rank": cfg.lora_rank,
            "alpha": cfg.lora_alpha or 2 * cfg.lora_rank,
            "targets": lora_targets(cfg),
            "dropout": cfg.lora_dropout,
            "trainable_parameters": lora.trainable_parameters,
            "merged": cfg.merge,
        },
        "data": cfg.data,
        "data_sha256": lora.data_sha256,
        "heldout_split": f"the last {cfg.val_fraction:.0%} of --data's documents, never trained on",
        "train_documents": a.doc_counts[0],
        "val_documents": a.doc_counts[1],
        "train_tokens": a.data.train.n_tokens,
        "val_tokens": final["val_tokens"],
        "block_size": a.data.train.block_size,
        "steps": st.step,
        "tokens_seen": st.tokens_seen,
        "epochs": round(st.tokens_seen / max(a.data.train.n_tokens, 1), 2),
        "wall_clock_s": round(wall, 1),
        # the held-out split: the base's figures, then base + adapter's
        "base_val_loss": round(before["val_loss"], 4),
        "base_val_bits_per_byte": round(before["val_bits_per_byte"], 4),
        "val_loss": round(final["val_loss"], 4),
        "val_bits_per_byte": round(final["val_bits_per_byte"], 4),
        "val_bits_per_byte_change": round(
            final["val_bits_per_byte"] - before["val_bits_per_byte"], 4
        ),
        # --eval-data sets, the same way
        "base_heldout_bits_per_byte": rounded(heldout_before),
        "heldout_bits_per_byte": rounded(heldout_figures(final)),
        # (MFU counts a full model's work: not an adapter run's)
        **run_facts(a, wall, rates=("tokens_per_s",)),
        "peft_version": peft.__version__,
    }


def render_lora_card(card: dict) -> str:
    """The README.md of an adapter (or merged) directory: what it is, its base, its data and the
    held-out figures before and after, from the card."""
    base, lora = card["base"], card["lora"]
    merged = card["kind"] == "merged"
    what = (
        "A GPT-2 checkpoint: the base below with a LoRA adapter merged into its weights"
        if merged
        else "A LoRA adapter (PEFT format)"
    )
    front = ["---", "library_name: " + ("transformers" if merged else "peft")]
    front += [f"base_model: {base['path']}", "tags:", "- gpt2", "- lora", "---"]
    rows = [
        ("held-out split of the data", card["base_val_bits_per_byte"], card["val_bits_per_byte"])
    ]
    rows += [
        (name, card["base_heldout_bits_per_byte"].get(name), value)
        for name, value in card["heldout_bits_per_byte"].items()
    ]
    table = ["| text | base | adapted | change |", "| --- | --- | --- | --- |"]
    for name, was, now in rows:
        change = f"{now - was:+.4f}" if was is not None else ""
        table.append(f"| {name} | {was} | {now} | {change} |")
    use = (
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(this_directory)"
        if merged
        else "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base["path"]}")\n'
        "model = PeftModel.from_pretrained(base, this_directory)"
    )
    return "\n".join(
        [
            *front,
            "",
            f"# {card['model_id']}",
            "",
            f"{what}, rank {lora['rank']}, alpha {lora['alpha']}, on "
            f"{', '.join(lora['targets'])} ({lora['trainable_parameters']:,} trained parameters), "
            f"trained with this repository's `lib.training` on `{card['data']}` "
            f"(sha256 {card['data_sha256'][:16]}…) for {card['steps']} steps, "
            f"{card['tokens_seen']:,} tokens, {card['wall_clock_s']} s.",
            "",
            f"Base: `{base['path']}` (checkpoint sha256 {base['sha256']}). Held out: "
            f"{card['heldout_split']} ({card['val_documents']} documents, {card['val_tokens']:,} "
            "tokens).",
            "",
            "## Bits per byte on held-out text",
            "",
            *table,
            "",
            "## Use",
            "",
            "```python",
            use,
            "```",
            "",
        ]
    )
