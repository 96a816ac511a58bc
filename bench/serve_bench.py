#!/usr/bin/env python
"""The serving benchmark, ours against `transformers serve`: the code is in bench/serving/ (see
`--help` for what it measures and how).

    python bench/serve_bench.py --stream --write BENCHMARKS.md --plot bench/serve_bench.png
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serving.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
