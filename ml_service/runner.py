"""Run a model service by name.

    python -m ml_service.runner list                      # installed services
    python -m ml_service.runner text-generation --port 8000
    python -m ml_service.runner score --checkpoint runs/baseline/final

Services are found through the entry-point group `ml_service.services` (see ml_service/contract.py).
Every option also has an ML_SERVICE_* environment variable; options given here win.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ml_service.contract import UnknownService, discover_services, load_service_class

OPTIONS = ("checkpoint", "random_preset", "host", "port", "device", "log_level")
# after the shutdown grace, the time left to answer the requests the app ended (503, a stream's
# `error` event) before uvicorn cancels what remains: orchestrators must wait longer than
# ML_SERVICE_SHUTDOWN_GRACE_S + this before they kill the process (tests/system/test_deploy.py)
SHUTDOWN_MARGIN_S = 2.0


def describe_services() -> list[tuple[str, str]]:
    rows = []
    for name in sorted(discover_services()):
        try:
            rows.append((name, load_service_class(name).description))
        except Exception as e:  # a broken plugin must not hide the others
            rows.append((name, f"(cannot be loaded: {e})"))
    return rows


def build_parser(default_service: str | None = None) -> argparse.ArgumentParser:
    listing = "\n".join(f"  {n:<18} {d}" for n, d in describe_services()) or "  (none)"
    p = argparse.ArgumentParser(
        prog="python -m ml_service.runner",
        description="Serve a model service over HTTP, chosen by name.",
        epilog=f"installed services:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "service",
        nargs=None if default_service is None else "?",
        default=default_service,
        help="service name, or 'list' to print the installed services",
    )
    p.add_argument(
        "--checkpoint", help="checkpoint directory (default: the embedded models/default)"
    )
    p.add_argument("--random-preset", help="serve a RANDOMLY INITIALISED preset (a speed baseline)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--log-level", help="log level (default info)")
    p.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    return p


def main(argv: list[str] | None = None, default_service: str | None = None) -> int:
    args = build_parser(default_service).parse_args(argv)
    if args.service == "list":
        for name, description in describe_services():
            print(f"{name:<18} {description}")
        return 0
    try:
        load_service_class(args.service)
    except UnknownService as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # options become settings through the environment, so `--reload` workers see them too
    os.environ["ML_SERVICE_SERVICE"] = args.service
    for name in OPTIONS:
        value = getattr(args, name)
        if value is not None:
            os.environ[f"ML_SERVICE_{name.upper()}"] = str(value)
    import uvicorn

    from ml_service.backend.http_protocol import ServiceHttpProtocol
    from ml_service.settings import get_settings

    settings = get_settings()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler that was
    # installed before it: make that an exit with status 0, as process supervisors expect
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # SIGTERM: stop accepting, let in-flight requests finish for up to shutdown_grace_s; then the
    # app ends what is left (503 with Retry-After, or a stream's `error` event: see
    # ml_service.shutdown), and uvicorn, which waits SHUTDOWN_MARGIN_S longer, cancels only what
    # could not even be answered. The app writes its own JSON access log. Connections: idle
    # keep-alive ones close after keep_alive_timeout_s, a request must arrive whole within
    # request_read_timeout_s (ServiceHttpProtocol), past max_connections a JSON 503.
    uvicorn.run(
        "ml_service.backend.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        reload=args.reload,
        log_level=settings.log_level,
        access_log=False,
        server_header=False,  # no `server: uvicorn` on every answer
        timeout_graceful_shutdown=settings.shutdown_grace_s + SHUTDOWN_MARGIN_S,
        http=ServiceHttpProtocol,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        limit_concurrency=settings.max_connections,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
