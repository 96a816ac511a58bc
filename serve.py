#!/usr/bin/env python
"""Serve a checkpoint over HTTP: `python serve.py [--checkpoint DIR] [--host H] [--port P] [--reload]`.

Every option has an ML_SERVICE_* environment variable (see HOW_TO_USE.md, "Settings");
options given here win.
"""

from __future__ import annotations

import argparse
import os

import uvicorn


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--checkpoint", help="checkpoint directory (default: the embedded models/default)"
    )
    p.add_argument("--random-preset", help="serve a RANDOMLY INITIALISED preset (a speed baseline)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    args = p.parse_args(argv)
    # the options become settings through the environment, so `--reload` workers see them too
    for name in ("checkpoint", "random_preset", "host", "port", "device"):
        value = getattr(args, name)
        if value is not None:
            os.environ[f"ML_SERVICE_{name.upper()}"] = str(value)
    from ml_service.settings import get_settings

    settings = get_settings()
    uvicorn.run(
        "ml_service.backend.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        reload=args.reload,
        log_level=settings.log_level,
    )


if __name__ == "__main__":
    main()
