"""The pages for people: GET / to try the classifier in a browser (drop, pick or paste images, see the
top-5 as bars), and GET /docs, the interactive API documentation (Swagger UI).

Both are static files served from here, with no CDN, no build step and nothing fetched from elsewhere
(the Content-Security-Policy says so to the browser). The try-it page is service/static/; Swagger UI's
JavaScript and CSS come from the ``fastapi-offline`` package, which ships them (FastAPI's own /docs loads
them from a CDN and starts them with an inline script, which this policy forbids: ``docs.js`` starts them
instead). The page's script calls ``GET /model`` and ``POST /classify`` exactly as any other client of
the API does; Swagger UI reads ``/openapi.json``.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from ..problems import ProblemError

router = APIRouter(tags=["page"], include_in_schema=False)

STATIC = resources.files("service") / "static"
SWAGGER_UI = resources.files("fastapi_offline") / "static"  # swagger-ui-dist's files, as released
CSS, JS = "text/css; charset=utf-8", "text/javascript; charset=utf-8"
ASSETS = {  # name → (media type, folder): only these names are served, so a name never reaches the filesystem
    "page.css": (CSS, STATIC),
    "page.js": (JS, STATIC),
    "favicon.svg": ("image/svg+xml", STATIC),
    "docs.css": (CSS, STATIC),
    "docs.js": (JS, STATIC),
    "swagger-ui.css": (CSS, SWAGGER_UI),
    "swagger-ui-bundle.js": (JS, SWAGGER_UI),
}
# Everything from this origin; images also from blob: URLs (the previews of the user's own files).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The same for /docs, but for images: swagger-ui.css draws its icons (the arrows of <select>s and of the
# schema toggles, the copy button) as data: URLs; it needs no blob: URLs. Scripts and styles: this origin's
# files only, as on the try-it page (no inline script, no eval).
DOCS_CSP = CSP.replace("img-src 'self' blob:", "img-src 'self' data:")
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def _html(name: str, csp: str) -> Response:
    html = (STATIC / name).read_bytes()
    return Response(html, media_type="text/html; charset=utf-8", headers={**HEADERS, "Content-Security-Policy": csp})


@router.get("/")
async def page() -> Response:
    return _html("index.html", CSP)


@router.get("/docs")
async def docs() -> Response:
    """Swagger UI for /openapi.json, every file of it from this server."""
    return _html("docs.html", DOCS_CSP)


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise ProblemError(404, None, f"no static file {name!r}")
    media_type, folder = ASSETS[name]
    return Response((folder / name).read_bytes(), media_type=media_type, headers=HEADERS)
