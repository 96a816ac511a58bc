"""The generated reference pages (docs/reference/) are what the code makes of them now: each page
is regenerated in memory by docs/generate_reference.py and compared with the committed one, so a
change to the settings, the training options, the error map or the exported metrics fails here
until `make docs-reference` rewrites the pages."""

from __future__ import annotations

import difflib
import importlib.util
import re

import pytest

from lib.presets import REPO_ROOT
from ml_service.backend import errors

GENERATOR = REPO_ROOT / "docs" / "generate_reference.py"
PAGES = ("settings.md", "training-flags.md", "errors.md", "metrics.md")


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("generate_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generator_writes_the_four_pages(generator):
    assert tuple(generator.PAGES) == PAGES


@pytest.mark.parametrize("name", PAGES)
def test_the_committed_page_is_what_the_code_generates(generator, name):
    path = generator.REFERENCE_DIR / name
    committed = path.read_text(encoding="utf-8") if path.exists() else ""
    generated = generator.render(name)
    if committed != generated:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                generated.splitlines(keepends=True),
                f"docs/reference/{name} (committed)",
                f"docs/reference/{name} (from the code)",
                n=0,
            )
        )
        pytest.fail(
            f"docs/reference/{name} differs from what the code generates: run "
            f"`make docs-reference` and commit the page.\n{diff[:4000]}",
            pytrace=False,
        )


def test_every_page_says_it_is_generated_and_how(generator):
    for name in PAGES:
        first = (generator.REFERENCE_DIR / name).read_text(encoding="utf-8").splitlines()[0]
        assert "Generated" in first and "`make docs-reference`" in first, name


def test_the_error_table_lists_every_status_in_rows_that_start_with_it():
    """The rows start with `| <status>`, as the check of the user guide's error table reads them
    (tests/ml_service/backend/test_errors.py)."""
    text = (REPO_ROOT / "docs" / "reference" / "errors.md").read_text(encoding="utf-8")
    listed = {int(s) for s in re.findall(r"^\| \**(\d{3})", text, flags=re.M)}
    found, todo = set(), [errors.ServiceError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    statuses = {c.status_code for c in found - {errors.HTTPError}}
    statuses |= {c.openai_status for c in found if c.openai_status}
    assert statuses | {404, 405} <= listed
