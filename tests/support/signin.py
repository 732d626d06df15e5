"""Sign in at the Entra ID stand-in without a browser: follow its pages with requests and fill in the forms, the
way a user would, until the form that posts back to the app's redirect URI. The browser test does the same with
Chromium; this is for the many tests that only need a consented mailbox.
"""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urljoin

import requests

# Every authorization code the stand-in handed to this process: the secret scan looks for each in the logs.
ISSUED_CODES: list[str] = []


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, object]] = []
        self.errors: list[str] = []
        self._in_error = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(
                {"action": a.get("action", ""), "method": a.get("method", "get").lower(), "fields": {}, "buttons": []}
            )
        elif tag in ("input", "button") and self.forms:
            form = self.forms[-1]
            kind = a.get("type", "submit" if tag == "button" else "text")
            if kind == "submit":
                form["buttons"].append((a.get("name", ""), a.get("value", ""), a))  # type: ignore[union-attr]
            elif a.get("name"):
                form["fields"][a["name"]] = a.get("value", "")  # type: ignore[index]


def sign_in(
    auth_uri: str,
    *,
    login: str,
    password: str,
    redirect_uri: str,
    session: requests.Session,
    accept: bool = True,
    max_steps: int = 8,
) -> dict[str, str]:
    """Return the fields the stand-in posts to ``redirect_uri`` (code, state, ... or error, error_description)."""
    response = session.get(auth_uri, allow_redirects=True, timeout=30)
    for _ in range(max_steps):
        response.raise_for_status()
        parser = _Forms()
        parser.feed(response.text)
        if not parser.forms:
            raise AssertionError(f"no form on the sign-in page {response.url} (status {response.status_code})")
        form = parser.forms[0]
        action = urljoin(response.url, str(form["action"]))
        fields = dict(form["fields"])  # type: ignore[call-overload]
        if action.split("?")[0] == redirect_uri:
            if fields.get("code"):
                ISSUED_CODES.append(fields["code"])
            return fields
        if "login" in fields:
            fields["login"] = login
        if "password" in fields:
            fields["password"] = password
        buttons = form["buttons"]
        wanted = "accept" if accept else "cancel"
        for name, value, attrs in buttons:  # type: ignore[attr-defined]
            label = f"{name} {value} {attrs.get('id', '')}".lower()
            if name and (wanted in label or (len(buttons) == 1)):  # type: ignore[arg-type]
                fields[name] = value
                break
        response = session.post(action, data=fields, allow_redirects=True, timeout=30)
    raise AssertionError("the sign-in did not reach the redirect URI")
