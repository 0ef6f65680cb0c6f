"""GET /: a page to try the classifier in a browser — drop, pick or paste images, see the top-5 as bars.

The page is three static files in service/static/ served from here: no CDN, no build step, nothing
fetched from elsewhere (the Content-Security-Policy says so to the browser). Its script calls
``GET /model`` and ``POST /classify`` exactly as any other client of the API does.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from ..problems import ProblemError

router = APIRouter(tags=["page"], include_in_schema=False)

STATIC = resources.files("service") / "static"
ASSETS = {
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Everything from this origin; images also from blob: URLs (the previews of the user's own files).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


@router.get("/")
async def page() -> Response:
    html = (STATIC / "index.html").read_bytes()
    return Response(html, media_type="text/html; charset=utf-8", headers={**HEADERS, "Content-Security-Policy": CSP})


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:  # only the page's own files: the name never reaches the filesystem otherwise
        raise ProblemError(404, None, f"no static file {name!r}")
    return Response((STATIC / name).read_bytes(), media_type=media_type, headers=HEADERS)
