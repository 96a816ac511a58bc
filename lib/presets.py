"""Model presets (the architectures of GPT-2-family models) and the repository's fixed paths.

Everything else in `lib` may import this module: it imports nothing of `lib` and no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "default"
EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class ModelPreset:
    """Architecture of a GPT-2-family causal LM."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    description: str

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def approx_parameters(self) -> int:
        """Parameter count of GPT-2 with tied input/output embeddings (exact for `build_model`)."""
        d, L = self.n_embd, self.n_layer
        per_block = 12 * d * d + 13 * d  # attention (4d^2+4d) + MLP (8d^2+5d) + 2 LayerNorms (4d)
        embeddings = self.vocab_size * d + self.n_positions * d
        return L * per_block + embeddings + 2 * d  # + final LayerNorm


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        # The embedded default: trained in 11.5 minutes on 2 CPU cores (`make train-baseline`).
        ModelPreset(
            "tiny",
            n_layer=4,
            n_head=4,
            n_embd=192,
            n_positions=256,
            vocab_size=8192,
            description="embedded default, 3.4M parameters, trains in 11 minutes on 2 CPU cores",
        ),
        # The OpenAI GPT-2 family sizes (vocabulary of 50,257 as in the original).
        ModelPreset("gpt2-124m", 12, 12, 768, 1024, 50257, "GPT-2 small"),
        ModelPreset("gpt2-350m", 24, 16, 1024, 1024, 50257, "GPT-2 medium"),
        ModelPreset("gpt2-774m", 36, 20, 1280, 1024, 50257, "GPT-2 large"),
        ModelPreset("gpt2-1.5b", 48, 25, 1600, 1024, 50257, "GPT-2 XL"),
        # ~1.0B with a Russian 50k vocabulary padded to a multiple of 128; heads of size 128 keep
        # attention matmuls efficient on tensor cores, 24 layers keep the model shallow and wide.
        ModelPreset(
            "gpt2-1b",
            24,
            14,
            1792,
            2048,
            50304,
            "1.0B, 24 layers x 1792 wide, 14 heads of 128, 50,304-token Russian vocabulary",
        ),
    ]
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
