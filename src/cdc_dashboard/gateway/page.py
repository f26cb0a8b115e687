"""Gateway routes: the live dashboard page (`GET /dashboard/{id}`) and its static files (`/static/...`).

The page needs no build step and no internet: plain HTML, CSS and ES modules from the package's `static`
directory. The token is checked here, before any HTML is sent, so a wrong or expired link gets a readable
401/403 page instead of an empty dashboard whose requests all fail.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from . import rejections
from .auth import authorize, canonical_uuid

__all__ = ["STATIC_DIR", "routes"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# The page only talks to its own origin. The token sits in the URL (EventSource cannot send headers), so the
# page must not leak it as a Referer, nor be framed by another site.
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}

_ERROR_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>{title}</title><link rel="stylesheet" href="../static/dashboard.css"></head>
<body><main><section class="panel"><h1>{title}</h1><p>{message}</p></section></main></body></html>
"""

_MESSAGES = {
    400: ("Not a dashboard address", "The address does not name a business. Check the link you were given."),
    401: ("This link does not work", "The dashboard link is missing its access token, or it has expired. "),
    403: ("Not your dashboard", "This access token does not grant access to this business."),
}


@cache
def _template() -> str:
    return (STATIC_DIR / "dashboard.html").read_text(encoding="utf-8")


def _error_page(exc: HTTPException) -> HTMLResponse:
    title, message = _MESSAGES.get(exc.status_code, ("Dashboard unavailable", "Try again in a moment."))
    if exc.status_code == 401:
        message += "Ask for a new link."
    body = _ERROR_PAGE.format(
        title=html.escape(title), message=html.escape(f"{message} ({exc.detail})" if exc.detail else message)
    )
    headers = dict(_PAGE_HEADERS)
    if exc.status_code == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="cdc-dashboard"'
    return HTMLResponse(body, status_code=exc.status_code, headers=headers)


async def dashboard_page(request: Request) -> Response:
    """The live dashboard of one business, for a token that names it."""
    raw_id = request.path_params["business_id"]
    # People open the page from links they paste or retype: any spelling of the UUID opens it, and the page then
    # uses the canonical form for everything it calls (the API itself takes only that form: auth.py).
    business_id = canonical_uuid(raw_id) or raw_id
    try:
        # The token may come in the URL: the page is opened by a link.
        authorize(request, business_id, allow_query_token=True)
    except HTTPException as exc:
        rejections.record(request, exc.status_code, rejections.reason_of(exc), str(exc.detail))
        return _error_page(exc)
    # `business_id` is now canonical UUID text: safe to place in HTML as is.
    page = _template().replace("{{business_id}}", business_id)
    return HTMLResponse(page, headers=_PAGE_HEADERS)


routes: list[BaseRoute] = [
    Route("/dashboard/{business_id}", dashboard_page, methods=["GET", "HEAD"], name="dashboard"),
    Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
]
