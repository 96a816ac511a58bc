"""The playground and the API docs in a real headless browser (Debian's chromium, driven by
Playwright), against the real server process, with every request outside the server blocked.

`make test` installs chromium when it is missing. Outside CI a machine without it skips these tests;
under CI (CI=true) they fail instead, so a broken install step cannot pass unnoticed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.helpers import is_russian

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
SCREENSHOTS = Path(os.environ.get("SCREENSHOT_DIR", "/tmp"))


def find_chromium() -> str | None:
    """$CHROMIUM, else the first chromium-like browser on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return next((path for path in map(shutil.which, names) if path), None)


def missing(reason: str):
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason} (CI=true: the browser test must run)")
    pytest.skip(
        f"{reason}; run `make test` (it installs chromium) or set CHROMIUM=/path/to/browser"
    )


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed")
    executable = find_chromium()
    if executable is None:
        missing("no chromium found on PATH")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server_url(live_server):
    """The session's real server (tests/conftest.py): the pages only read from it."""
    return live_server.url


@pytest.fixture
def page(browser, server_url):
    """A fresh page that may only reach the server: anything else is aborted and recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="ru-RU")
    page = context.new_page()
    page.set_default_timeout(30_000)
    server = urlsplit(server_url).netloc
    page.blocked = []  # requests to anywhere but the server
    page.errors = []  # uncaught exceptions and console errors

    def only_the_server(route):
        url = route.request.url
        if urlsplit(url).netloc == server or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            page.blocked.append(url)
            route.abort()

    page.route("**/*", only_the_server)
    page.on("pageerror", lambda e: page.errors.append(str(e)))

    def console(message):
        # an HTTP error status is logged too: the tests check statuses themselves
        if message.type == "error" and "the server responded with a status of" not in message.text:
            page.errors.append(message.text)

    page.on("console", console)
    yield page
    context.close()


def generate(page, *, stream: bool) -> str:
    page.fill("#prompt", "Привет, мир!")
    page.fill("#max_new_tokens", "24")
    page.fill("#min_new_tokens", "12")
    page.fill("#seed", "1")
    if page.is_enabled("#stream"):
        page.set_checked("#stream", stream)
    page.click("#generate")
    page.wait_for_selector(
        "#status[data-state='done'], #status[data-state='error']", timeout=90_000
    )
    status = page.text_content("#status")
    assert page.get_attribute("#status", "data-state") == "done", status
    return page.text_content("#output-text")


def test_playground_loads_metadata_and_generates_russian(page, server_url):
    page.goto(server_url + "/")
    page.wait_for_selector("#model-info[data-state='loaded']")
    assert page.text_content("#model-id") == "ru-gpt-tiny"
    assert "1,350,400" in page.text_content("#model-info")

    streamed = generate(
        page, stream=True
    )  # falls back to a plain request where streaming is absent
    assert is_russian(streamed), streamed
    assert "finish reason" in page.text_content("#status")
    page.screenshot(path=str(SCREENSHOTS / "playground.png"), full_page=True)

    plain = generate(page, stream=False)
    assert is_russian(plain), plain
    assert page.text_content("#output-prompt") == "Привет, мир!"
    assert not page.blocked, f"the page reached outside the server: {page.blocked}"
    assert not page.errors, page.errors


def test_the_form_shows_the_servers_defaults_from_metadata(page, server_url):
    """The page writes no defaults of its own: /metadata's `sampling` fills the form."""
    from lib.inference import GenerationParams

    p = GenerationParams()
    page.goto(server_url + "/")
    page.wait_for_selector("#model-info[data-state='loaded']")
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"):
        assert float(page.input_value(f"#{name}")) == getattr(p, name), name
    assert page.text_content("#temperature-value") == str(p.temperature)
    assert not page.errors, page.errors


def sse(*events: tuple[str, dict], newline: str = "\n") -> str:
    return "".join(
        f"event: {name}{newline}data: {json.dumps(data, ensure_ascii=False)}{newline}{newline}"
        for name, data in events
    )


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_playground_renders_server_sent_events(page, server_url, newline):
    """The streaming contract of POST /forward with "stream": true, played by the browser's router:
    `token` events append to the output, `done` carries the whole response."""
    pieces = ["Москва", " — ", "столица", " России."]
    done = {
        "text": "".join(pieces),
        "finish_reason": "eos",
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        "model": "ru-gpt-tiny",
    }
    seen = []

    def streaming_forward(route):
        seen.append(json.loads(route.request.post_data))
        events = [("token", {"text": p}) for p in pieces] + [("done", done)]
        route.fulfill(
            status=200, content_type="text/event-stream", body=sse(*events, newline=newline)
        )

    page.goto(server_url + "/")
    page.route(f"{server_url}/forward", streaming_forward)
    page.fill("#prompt", "Москва")
    page.click("#generate")
    page.wait_for_selector("#status[data-state='done']")
    assert seen and seen[0]["stream"] is True and seen[0]["text"] == "Москва"
    assert page.text_content("#output-text") == "Москва — столица России."
    assert "finish reason: eos" in page.text_content("#status")
    assert not page.errors, page.errors


def test_playground_shows_an_error_event(page, server_url):
    def failing_forward(route):
        body = sse(
            ("token", {"text": "Мо"}), ("error", {"detail": "модель не смогла обработать данные"})
        )
        route.fulfill(status=200, content_type="text/event-stream", body=body)

    page.goto(server_url + "/")
    page.route(f"{server_url}/forward", failing_forward)
    page.click("#generate")
    page.wait_for_selector("#status[data-state='error']")
    assert "модель не смогла обработать данные" in page.text_content("#status")
    assert page.text_content("#output-text") == "Мо"


def test_playground_shows_a_bad_request(page, server_url):
    page.goto(server_url + "/")
    page.wait_for_selector("#model-info[data-state='loaded']")
    page.fill("#prompt", "Привет")
    # past the service's limit but inside the form's: the server's 400 is shown
    page.evaluate("document.getElementById('max_new_tokens').max = 100000")
    page.fill("#max_new_tokens", "100000")
    page.click("#generate")
    page.wait_for_selector("#status[data-state='error']")
    assert "max_new_tokens" in page.text_content("#status")
    assert not page.errors, page.errors


def test_swagger_ui_renders_offline(page, server_url):
    page.goto(server_url + "/docs")
    path = page.locator(".opblock-summary-path", has_text="/forward").first
    path.wait_for()
    paths = page.locator(".opblock-summary-path").all_text_contents()
    assert {"/forward", "/forward_batch", "/metadata", "/health"} <= {p.strip() for p in paths}
    page.screenshot(path=str(SCREENSHOTS / "docs.png"))
    assert not page.blocked, f"Swagger UI reached outside the server: {page.blocked}"
    assert not page.errors, page.errors


def test_redoc_renders_offline(page, server_url):
    page.goto(server_url + "/redoc")
    page.get_by_text("/forward_batch").first.wait_for()
    assert "text-generation" in page.text_content("body")
    assert not page.blocked, f"ReDoc reached outside the server: {page.blocked}"
    # ReDoc's sidebar logo comes from a CDN: the page's CSP blocks it and the logo hides itself
    assert [e for e in page.errors if "redoc/logo-mini.svg" not in e] == []
