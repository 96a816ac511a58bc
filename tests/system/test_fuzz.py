"""Property-based fuzzing of our own OpenAPI schema with schemathesis (its CLI, `st run`), against
the real server over HTTP: whatever it sends, no 5xx, and every response matches the schema the
service publishes (status codes, content types, headers and bodies)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lib.presets import REPO_ROOT
from tests.helpers import CHECKPOINT, running_server

pytestmark = pytest.mark.slow

# small limits keep each generated request quick; they change no code path
FUZZ_ENV = {
    "ML_SERVICE_MAX_NEW_TOKENS_LIMIT": "16",
    "ML_SERVICE_MAX_TEXTS": "4",
    "ML_SERVICE_ADMIN_TOKEN": "fuzz-admin",
}
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "wrong_type_is_a_400",  # ours (schemathesis_hooks.py): a number or boolean of a wrong type
]


def st_command() -> list[str]:
    st = Path(sys.executable).parent / "st"
    return [str(st)] if st.exists() else [shutil.which("st") or "st"]


def test_schemathesis_finds_no_server_error_and_no_schema_violation():
    with running_server(["--checkpoint", str(CHECKPOINT)], env=FUZZ_ENV) as proc:
        run = subprocess.run(
            [
                *st_command(),
                "run",
                f"{proc.url}/openapi.json",
                "--checks",
                ",".join(CHECKS),
                "--max-examples",
                "60",
                "--request-timeout",
                "60",
                "--header",
                "Authorization: Bearer fuzz-admin",  # reach the admin routes too
                "--seed",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=REPO_ROOT,
            # also bodies nested too deep, texts with lone surrogates and fields of the wrong
            # type (schemathesis_hooks.py)
            env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.system.schemathesis_hooks"},
        )
        log = proc.log.read_text()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Traceback" not in log, log[-4000:]
    summary = run.stdout[run.stdout.rindex("Test cases:") :]
    generated = int(summary.split()[2])
    assert generated >= 200, summary  # it really exercised the API
