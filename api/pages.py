"""What the routes answer with: small HTML pages for the browser (consent) and JSON for the admin routes. Every
value on a page is escaped; nothing secret is passed in."""

from __future__ import annotations

import html
import json
from typing import Any

import azure.functions as func

# No scripts, no frames, no referrer: the page only shows text.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def render(title: str, message: str, next_step: str = "", *, ok: bool = False) -> str:
    """A complete HTML document with a heading, a message and, optionally, what to do next."""
    colour = "#0a7d32" if ok else "#a4262c"
    step = f"<p><strong>Next:</strong> {html.escape(next_step)}</p>" if next_step else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        "<style>body{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem}"
        f"h1{{color:{colour};font-size:1.4rem}}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>{step}</body></html>"
    )


def page(status: int, title: str, message: str, next_step: str = "", *, ok: bool = False) -> func.HttpResponse:
    """An HTML answer with the security headers."""
    return func.HttpResponse(
        render(title, message, next_step, ok=ok),
        status_code=status,
        mimetype="text/html",
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )


def json_answer(status: int, body: Any) -> func.HttpResponse:
    """A JSON answer with the security headers; dates and other non-JSON values are written as text."""
    return func.HttpResponse(
        json.dumps(body, default=str), status_code=status, mimetype="application/json", headers=SECURITY_HEADERS
    )


def redirect(location: str) -> func.HttpResponse:
    """A 302 to ``location`` with the security headers (the browser follows it; nothing is shown)."""
    return func.HttpResponse(status_code=302, headers={**SECURITY_HEADERS, "Location": location})
