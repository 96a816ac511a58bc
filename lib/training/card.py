"""What a run says about its model: the training card (training_card.json in the checkpoint), its
README (the card as a model card), the generation defaults written beside the weights, and the
sample continuations, in the card and, every `--sample-every` steps, in the log.

They follow the serving defaults (`GenerationParams`), which is why they live here, above
lib/inference, and not with the checkpoint files below it: `save_checkpoint` writes what it is
given.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig

from lib.inference.generation import generate
from lib.inference.types import GenerationParams
from lib.modeling import TRAINING_DATA, TRAINING_RESULTS, count_parameters, unwrap_model
from lib.training.artifacts import TrainingArtifacts
from lib.training.callbacks import Callback, RunState
from lib.training.evaluation import heldout_figures

SAMPLE_PROMPTS = ["Привет, мир!", "Москва", "Он открыл дверь и", "В начале было"]


SAMPLE_TOKENS, SAMPLE_SEED = 40, 0  # a training card's sample continuations


def sample_params(seed: int = SAMPLE_SEED):
    """How a training card's sample continuations are decoded: the serving defaults
    (`GenerationParams`), SAMPLE_TOKENS new tokens, a fixed seed."""
    return GenerationParams(max_new_tokens=SAMPLE_TOKENS, seed=seed)


def default_generation_config(eos_token_id: int) -> GenerationConfig:
    """`generate()`'s defaults in the checkpoint (generation_config.json): the serving defaults
    (`GenerationParams`), so plain `transformers` decodes the way the service does."""
    p = GenerationParams()
    return GenerationConfig(
        do_sample=p.temperature > 0,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        max_new_tokens=p.max_new_tokens,
        min_new_tokens=p.min_new_tokens,
        repetition_penalty=p.repetition_penalty,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def render_model_card(card: dict) -> str:
    """The checkpoint's README.md: the training card as a Hugging Face model card."""
    lines = [
        "---",
        "language: ru",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "---",
        f"# {card.get('model_id', 'GPT-2 checkpoint')}",
        "",
        "A GPT-2-family causal language model trained from scratch with this repository's `lib.training`.",
        "It loads with `transformers.AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`.",
        "",
        "| field | value |",
        "| --- | --- |",
    ]
    model = ("preset", "parameters", *TRAINING_DATA, "vocab_size", "block_size")
    for key in (*model, *TRAINING_RESULTS, "device", "torch_version", "transformers_version"):
        if key in card and card[key] not in ({}, None):
            value = card[key]
            if isinstance(value, dict):  # {held-out set: bits/byte}
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            lines.append(f"| {key} | {value} |")
    samples = card.get("samples") or []
    if samples:
        p = sample_params()
        heading = f"## Samples (temperature {p.temperature}, top-p {p.top_p}, seed {p.seed})"
        lines += ["", heading, ""]
        lines += [f"- **{s['prompt']}** → {s['completion']}" for s in samples]
    return "\n".join(lines) + "\n"


def training_card(a: TrainingArtifacts, model: torch.nn.Module, final: dict, wall: float) -> dict:
    cfg, st = a.config, a.state
    return {
        "model_id": cfg.run_name or Path(cfg.output_dir).name,
        "preset": a.preset.name,
        "parameters": count_parameters(model),
        "data": cfg.data,
        "train_documents": a.doc_counts[0],
        "val_documents": a.doc_counts[1],
        "train_documents_dropped_as_heldout": a.doc_counts[2],
        "train_tokens": a.data.train.n_tokens,
        "val_tokens": final["val_tokens"],
        "vocab_size": model.config.vocab_size,
        "block_size": a.data.train.block_size,
        "steps": st.step,
        "tokens_seen": st.tokens_seen,
        "epochs": round(st.tokens_seen / max(a.data.train.n_tokens, 1), 2),
        "wall_clock_s": round(wall, 1),
        "val_loss": round(final["val_loss"], 4),
        "val_bits_per_byte": round(final["val_bits_per_byte"], 4),
        # --eval-data: bits/byte of each named held-out set (out-of-domain text)
        "heldout_bits_per_byte": {k: round(v, 4) for k, v in heldout_figures(final).items()},
        "stop_reason": st.stop_reason or "max_steps",
        "resumed_from": str(a.resumed_from) if a.resumed_from else None,
        "config": cfg.to_dict(),
        "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        if a.device.type == "cpu"
        else torch.cuda.get_device_name(a.device),
        "precision": a.precision,
        "mode": cfg.mode,
        "world_size": a.ctx.world_size,
        # the last window's figures (all ranks' tokens; MFU against all ranks' peak, when known; a
        # window that held an evaluation or a save is slower) and the run's mean (all of it counted)
        "throughput": {k: st.metrics[k] for k in ("tokens_per_s", "mfu") if k in st.metrics}
        | {"mean_tokens_per_s": round(st.tokens_seen / max(wall, 1e-9), 1)},
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "samples": sample_continuations(model, a.tokenizer),
    }


def sample_continuations(
    model, tokenizer, prompts: list[str] = SAMPLE_PROMPTS, seed: int = SAMPLE_SEED
) -> list[dict]:
    params = sample_params(seed)  # the serving defaults (the model card names them)
    results = generate(model, tokenizer, prompts, [params] * len(prompts))
    return [{"prompt": p, "completion": r.text} for p, r in zip(prompts, results, strict=True)]


class Samples(Callback):
    """Sample continuations of `SAMPLE_PROMPTS` every `every` steps, into the step's metrics (one
    process only: the model is whole there)."""

    def __init__(self, model: torch.nn.Module, tokenizer, every: int):
        self.model, self.tokenizer, self.every = model, tokenizer, every

    def on_step_metrics(self, state: RunState) -> None:
        if self.every and state.step % self.every == 0:
            samples = sample_continuations(unwrap_model(self.model), self.tokenizer)
            state.metrics["samples"] = "\n".join(
                f"{s['prompt']} → {s['completion']}" for s in samples
            )
