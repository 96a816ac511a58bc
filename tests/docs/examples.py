"""The docs' examples, run as tests (Sybil collects them: the repository's conftest.py).

Every ```python and ```bash block of README.md and docs/ runs, in page order, against a real
server that the tests start (`docs_server`): the page's `localhost:8000` is that server's address.
Python blocks share one namespace per page; bash blocks run with this interpreter's `python` first
on PATH, from the repository root. An ```output block right after a block is what that block
prints: the test fails when the printed text differs (`...` in a shown output stands for any
text, for what changes from run to run: ids, timings). A block that cannot run here (a GPU,
Docker, a long training run, a server of its own) follows `<!-- skip: next "why" -->`, and its page
says so in words.

`make docs-outputs` (DOCS_UPDATE_OUTPUTS=1) runs the pages and writes what each block printed into
its ```output block instead of failing: the way to refresh the shown outputs when the default model
changes. A shown output with `...` that still matches is left as it is.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
UPDATE = os.environ.get("DOCS_UPDATE_OUTPUTS") == "1"
DOCS_PORT = "localhost:8000"
BLOCK_TIMEOUT_S = 600
LAST_OUTPUT = "_docs_last_output"
# the pages whose examples run (paths from the repository root; pytest's testpaths name README.md
# and docs/); a page joins once its blocks run or say why they are skipped
PAGES: list[str] = [
    "README.md",
    "docs/index.md",
    "docs/serve.md",
    "docs/openai.md",
    "docs/train.md",
    "docs/operate.md",
    "docs/deploy.md",
    "docs/extend.md",
    "docs/architecture.md",
]


@dataclass
class Rewrite:
    """A shown output to replace with what its block printed (DOCS_UPDATE_OUTPUTS=1)."""

    path: Path
    start: int  # the output block's source, as offsets into the page's text
    end: int
    text: str


REWRITES: list[Rewrite] = []


def _with_server(source: str, namespace: dict) -> str:
    """The block's source with the page's server address replaced by the test server's."""
    server = namespace["docs_server"]
    address = server.url.removeprefix("http://")
    return source.replace(DOCS_PORT, address).replace("127.0.0.1:8000", address)


def run_python(example) -> None:
    """Run a ```python block in its page's namespace; keep what it printed for an output block."""
    namespace = example.namespace
    source = _with_server(example.parsed, namespace)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), _cwd(REPO_ROOT):
        exec(compile(source, f"{example.path}:{example.line}", "exec"), namespace)
    namespace[LAST_OUTPUT] = printed.getvalue()


def run_bash(example) -> None:
    """Run a ```bash block (`set -euo pipefail`) from the repository root, `python` being this
    interpreter; keep its standard output for an output block."""
    namespace = example.namespace
    source = _with_server(example.parsed, namespace)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{source}"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{example.path}:{example.line}: the block exited {done.returncode}\n"
            f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
        )
    namespace[LAST_OUTPUT] = done.stdout


def check_output(example) -> None:
    """Compare an ```output block with what the block before it printed."""
    namespace = example.namespace
    if LAST_OUTPUT not in namespace:
        raise AssertionError(f"{example.path}:{example.line}: an output block follows no example")
    printed = _normalise(namespace.pop(LAST_OUTPUT))
    shown = _normalise(example.parsed)
    if _matches(shown, printed):
        return
    if UPDATE:
        text = example.document.text
        # the block's body starts on the line after its opening fence (it may be empty)
        start = text.index(example.parsed, text.index("\n", example.start) + 1)
        REWRITES.append(Rewrite(Path(example.path), start, start + len(example.parsed), printed))
        return
    raise AssertionError(
        f"{example.path}:{example.line}: the page shows\n{shown}\nbut the block printed\n"
        f"{printed}\n(when the default model changed, `make docs-outputs` rewrites the shown outputs)"
    )


def apply_rewrites() -> list[Path]:
    """Write the recorded outputs into their pages (last first, so offsets stay valid)."""
    by_page: dict[Path, list[Rewrite]] = {}
    for r in REWRITES:
        by_page.setdefault(r.path, []).append(r)
    for path, rewrites in by_page.items():
        text = path.read_text(encoding="utf-8")
        for r in sorted(rewrites, key=lambda r: r.start, reverse=True):
            text = text[: r.start] + r.text + "\n" + text[r.end :]
        path.write_text(text, encoding="utf-8")
    REWRITES.clear()
    return sorted(by_page)


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def _matches(shown: str, printed: str) -> bool:
    if "..." not in shown:
        return shown == printed
    pattern = ".*?".join(re.escape(part) for part in shown.split("..."))
    return re.fullmatch(pattern, printed, flags=re.DOTALL) is not None


@contextlib.contextmanager
def _cwd(path: Path):
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)
