"""The playground page and the offline API docs, over the app's HTTP interface (no browser: that is
tests/system/test_browser.py). Everything a page loads must come from the service itself."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib.presets import REPO_ROOT
from ml_service.backend.ui import STATIC_DIR, install_ui


class AssetLinks(HTMLParser):
    """The URLs a page loads by itself: scripts, stylesheets, icons, images."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "img") and a.get("src"):
            self.urls.append(a["src"])
        if tag == "link" and a.get("href"):
            self.urls.append(a["href"])


def assets_of(html: str) -> list[str]:
    parser = AssetLinks()
    parser.feed(html)
    return parser.urls


def absolute(url: str, page: str = "/") -> str:
    """`url` as the browser resolves it from `page` (the pages use relative and rooted URLs)."""
    assert not re.match(r"^[a-z]+:|^//", url), f"{url} is not served by the service"
    return url if url.startswith("/") else page.rsplit("/", 1)[0] + "/" + url


@pytest.mark.parametrize("path", ["/", "/docs", "/redoc"])
def test_page_loads_only_its_own_assets(client, path):
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = assets_of(r.text)
    assert any(u.endswith(".js") for u in urls), urls
    for url in urls:
        asset = client.get(absolute(url, path))
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for cdn in ("cdn.jsdelivr", "unpkg", "fonts.googleapis", "fastapi.tiangolo.com"):
        assert cdn not in r.text


def test_playground_page_is_complete(client):
    html = client.get("/").text
    for element in ('id="prompt"', 'id="max_new_tokens"', 'id="temperature"', 'id="stream"'):
        assert element in html
    assert 'id="model-info"' in html and 'id="output-text"' in html


@pytest.mark.parametrize("name", ["app.js", "style.css"])
def test_playground_code_names_no_other_host(name):
    """Plain JS and CSS written for this page: no URL of another host, no import of a library."""
    text = (STATIC_DIR / name).read_text(encoding="utf-8")
    assert not re.search(r"https?://", text), name
    assert "import " not in text and "require(" not in text


def test_playground_requests_are_relative(client):
    """The page's fetches use relative URLs, so it works behind a proxy that adds a prefix."""
    js = client.get("/static/app.js").text
    assert re.findall(r'fetch\("([^"]+)"', js) == ["metadata", "forward"]


def test_swagger_ui_never_calls_the_online_validator(client):
    html = client.get("/docs").text
    assert '"validatorUrl": null' in html
    assert "url: '/openapi.json'" in html
    assert client.get("/docs/oauth2-redirect").status_code == 200


def test_ui_routes_stay_out_of_the_api_schema(client):
    paths = set(client.get("/openapi.json").json()["paths"])
    assert "/forward" in paths
    assert not paths & {"/", "/docs", "/redoc", "/docs/oauth2-redirect"}


def test_docs_follow_the_root_path(client):
    """Behind a proxy that strips a prefix (`--root-path /gpt`), the docs load from under it."""
    # no `with`: the pages need no model, so the app's lifespan is not run a second time
    html = TestClient(client.app, root_path="/gpt").get("/docs").text
    assert "/gpt/docs-assets/swagger-ui-bundle.js" in html and "/gpt/openapi.json" in html


def test_install_ui_refuses_an_app_with_cdn_docs():
    with pytest.raises(ValueError, match="docs_url=None"):
        install_ui(FastAPI())


@pytest.mark.slow
def test_a_built_wheel_ships_the_playground(tmp_path):
    """A non-editable install (the Docker image) has the page: the files are package data."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    for package in ("lib", "ml_service"):
        shutil.copytree(
            REPO_ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(src)],
        check=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"ml_service/static/{p.name}" for p in STATIC_DIR.iterdir()}
    assert expected <= names, expected - names
