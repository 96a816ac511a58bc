#!/usr/bin/env python
"""The serving benchmark through /v1/completions, ours against `transformers serve` and vLLM's CPU
build: the code is in bench/serving/ (see `--help` for what it measures and how).

    python bench/serve_bench.py --systems ours ours-nobatch tf-serve-cb vllm-cpu \
        --concurrency 1 16 64 --stream --write BENCHMARKS.md --plot bench/serve_bench.png
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serving.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
