"""pytest's set-up for the whole repository: the docs' examples run as tests.

Sybil collects README.md and the pages under docs/ (not the generated reference pages, nor the
dated experiment pages, which record past runs): tests/docs/examples.py says how a block runs and
how its shown output is checked. The tests of the code itself live in tests/ (tests/conftest.py).
"""

from __future__ import annotations

import pytest
from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser, SkipParser

from tests.docs import examples
from tests.helpers import CHECKPOINT, running_server


@pytest.fixture(scope="session")
def live_server():
    """One real server process (`serve.py --checkpoint CHECKPOINT`, the default settings and
    engine), started once for the session: its `.url`, and its output in the file `.log`.

    Shared by the docs' examples and the tests that only send it ordinary requests and read the
    answers: tests/ml_service/backend/test_openai.py (the official clients),
    tests/system/test_browser.py (the playground and the API docs), and test_hardening's check of
    the real server's headers. That is safe because none of them changes the server (no settings,
    no reload, no signal), and none reads a metric's absolute value. A test that stops the server,
    or needs other settings, starts its own (`tests.helpers.running_server`), as
    tests/system/test_server.py does."""
    with running_server(["--checkpoint", str(CHECKPOINT)]) as proc:
        yield proc


@pytest.fixture(scope="session")
def docs_server(live_server):
    return live_server


pytest_collect_file = Sybil(
    parsers=[
        SkipParser(),
        CodeBlockParser(language="python", evaluator=examples.run_python),
        CodeBlockParser(language="bash", evaluator=examples.run_bash),
        CodeBlockParser(language="output", evaluator=examples.check_output),
    ],
    patterns=examples.PAGES,
    fixtures=["docs_server"],
).pytest()


def pytest_sessionfinish(session, exitstatus):
    if examples.UPDATE:
        for page in examples.apply_rewrites():
            print(f"\nrewrote the shown outputs of {page}")
