"""What a browser sees: the playground page at `/` and the API docs at `/docs` and `/redoc`.

Every asset is served by the service itself, so all three pages work with no internet. The docs
use the Swagger UI and ReDoc bundles that the `fastapi-offline` package ships (FastAPI's own docs
pages load them from a CDN; the app is created with `docs_url=None, redoc_url=None` and these
routes replace them).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
DOCS_URL, REDOC_URL = "/docs", "/redoc"
STATIC_URL, DOCS_ASSETS_URL = "/static", "/docs-assets"

# The browser itself refuses anything from elsewhere: an air-gapped page never waits on a lookup.
# (ReDoc's sidebar logo points at a CDN; blocked, it hides itself.) The docs pages start their
# bundles with an inline script and ReDoc's styles are injected inline, hence 'unsafe-inline' there.
PLAYGROUND_CSP = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'"
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; base-uri 'none'"
)


def install_ui(app: FastAPI) -> None:
    """Add `/` (the playground), `/static/*`, `/docs`, `/redoc` and their assets to `app`."""
    if app.docs_url or app.redoc_url:
        raise ValueError(
            "create the app with docs_url=None, redoc_url=None: install_ui serves them"
        )
    for directory, what in ((STATIC_DIR, "playground"), (DOCS_ASSETS_DIR, "API docs")):
        if not directory.is_dir():
            raise RuntimeError(f"the {what} assets are missing: {directory}")
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or f"{DOCS_URL}/oauth2-redirect"

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            media_type="text/html",
            headers={"Content-Security-Policy": PLAYGROUND_CSP},
        )

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} — Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.svg",
            oauth2_redirect_url=f"{root}{oauth2_redirect_url}",
            # validatorUrl: Swagger UI would otherwise send the schema to an online validator
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None},
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} — ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/favicon.svg",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page
