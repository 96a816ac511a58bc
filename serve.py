#!/usr/bin/env python
"""Serve a checkpoint over HTTP with the text-generation service (or another, by name).

    python serve.py [--checkpoint DIR] [--host H] [--port P] [--reload]
    python serve.py score --checkpoint DIR

The same runner as `python -m ml_service.runner`; every option has an ML_SERVICE_* variable.
"""

import sys

from ml_service.contract import DEFAULT_SERVICE
from ml_service.runner import main

if __name__ == "__main__":
    sys.exit(main(default_service=DEFAULT_SERVICE))
