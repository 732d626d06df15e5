"""The small HTML pages the consent flow answers with. Every value is escaped; nothing secret is passed in."""

from __future__ import annotations

import html

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
