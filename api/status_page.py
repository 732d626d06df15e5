"""The status page's HTML: every mailbox with its state, token age and last error, a filter, and one form per
action. No script: filters are a GET form, actions are POST forms carrying the session's CSRF token. Every value
is escaped; no token, key or secret is ever passed in (the re-consent link is shown only to the admin who asked
for it, once, in the answer to that POST)."""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from collectors.operations import APP, TOKEN_WARNING, mode_of, token_expires_at
from shared.registry import Mailbox, MailboxStatus, utcnow

ACTIVE, PAUSED, NEEDS_RECONSENT = MailboxStatus.ACTIVE, MailboxStatus.PAUSED, MailboxStatus.NEEDS_RECONSENT
STATUSES = tuple(s.value for s in MailboxStatus)

PAGE_ROUTE = "ops"
STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1b1b1b}h1{font-size:1.4rem}"
    "table{border-collapse:collapse;width:100%;font-size:.85rem}th,td{border-bottom:1px solid #ddd;padding:.4rem;"
    "text-align:left;vertical-align:top}th{background:#f3f3f3}.active{color:#0a7d32}.paused{color:#8a6d00}"
    ".needs_reconsent,.disabled,.warn{color:#a4262c}.note{background:#eef6ee;border:1px solid #0a7d32;padding:.6rem}"
    ".problem{background:#fdecea;border:1px solid #a4262c;padding:.6rem}form.inline{display:inline}"
    "button{margin:.1rem;font-size:.8rem}code{word-break:break-all}.remedy{color:#555}"
)


@dataclass(frozen=True)
class Notice:
    text: str
    ok: bool = True
    detail: Sequence[str] = ()
    link: str = ""  # a re-consent link, shown once as text to copy


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else "never"


def _age(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "unknown"
    seconds = int((now - moment).total_seconds())
    if seconds < 3600:
        return f"{max(0, seconds) // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def _button(csrf: str, address: str, action: str, label: str) -> str:
    return (
        f"<form class=inline method=post action={PAGE_ROUTE}><input type=hidden name=csrf value='{_e(csrf)}'>"
        f"<input type=hidden name=mailbox value='{_e(address)}'><button name=action value={action}>{_e(label)}"
        "</button></form>"
    )


def _token_cell(mailbox: Mailbox, now: datetime) -> str:
    if mode_of(mailbox) == APP:
        return "app token (no refresh token)"
    expires = token_expires_at(mailbox)
    if expires is None:
        return "not saved yet"
    warn = " class=warn" if expires - now <= TOKEN_WARNING else ""
    return f"age {_e(_age(mailbox.token_saved_at, now))}<br><span{warn}>expires if unused {_e(_when(expires))}</span>"


def _error_cell(mailbox: Mailbox) -> str:
    if not mailbox.last_error_class:
        return "-"
    text, _, remedy = mailbox.last_error.partition(" -- ")
    return f"<strong>{_e(mailbox.last_error_class)}</strong>: {_e(text)}" + (
        f"<br><span class=remedy>Remedy: {_e(remedy)}</span>" if remedy else ""
    )


def _actions(mailbox: Mailbox, csrf: str) -> str:
    a = mailbox.address
    parts = [_button(csrf, a, "collect", "Collect now")]
    if mailbox.status == PAUSED:
        parts.append(_button(csrf, a, "resume", "Resume"))
    elif mailbox.status == ACTIVE:
        parts.append(_button(csrf, a, "pause", "Pause"))
    if mode_of(mailbox) != APP:
        parts.append(_button(csrf, a, "link", "Re-consent link"))
    parts += [_button(csrf, a, "test", "Test connection"), _button(csrf, a, "diagnose", "Diagnose")]
    parts.append(_button(csrf, a, "revoke", "Revoke..."))
    return "".join(parts)


def _row(mailbox: Mailbox, csrf: str, now: datetime) -> str:
    today = mailbox.collected_today if mailbox.collected_day == now.date().isoformat() else 0
    oversize = f"<br><span class=warn>{_e(mailbox.last_oversize)}</span>" if mailbox.last_oversize else ""
    return (
        f"<tr id='m-{_e(mailbox.key)}'><td>{_e(mailbox.address)}"
        + (f"<br><small>as {_e(mailbox.signed_in_as)}</small>" if mailbox.signed_in_as != mailbox.address else "")
        + f"</td><td>{_e(mode_of(mailbox))}</td><td class={_e(mailbox.status)}>{_e(mailbox.status)}</td>"
        f"<td>{_e(_when(mailbox.last_success_at))}</td><td>{_error_cell(mailbox)}</td>"
        f"<td>{mailbox.consecutive_failures}</td><td>{_token_cell(mailbox, now)}</td>"
        f"<td>{_e(mailbox.options.folder)}<br>UIDVALIDITY {mailbox.uidvalidity}, UID {mailbox.last_uid}</td>"
        f"<td>{today}{oversize}</td><td>{_actions(mailbox, csrf)}</td></tr>"
    )


def select(mailboxes: Iterable[Mailbox], *, status: str, text: str, problems: bool) -> list[Mailbox]:
    """The mailboxes the filter keeps, sorted by address."""
    text = text.strip().lower()
    kept = [
        m
        for m in mailboxes
        if (not status or m.status == status)
        and (not text or text in m.address)
        and (not problems or m.status == NEEDS_RECONSENT or m.consecutive_failures > 0 or bool(m.last_oversize))
    ]
    return sorted(kept, key=lambda m: m.address)


def _notice(notice: Notice | None) -> str:
    if notice is None:
        return ""
    body = f"<p>{_e(notice.text)}</p>"
    if notice.link:
        body += f"<p><code id=reconsent-link>{_e(notice.link)}</code></p>"
    if notice.detail:
        body += "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in notice.detail) + "</ul>"
    return f"<div id=notice class={'note' if notice.ok else 'problem'} role=status>{body}</div>"


def render_status(
    mailboxes: Sequence[Mailbox],
    *,
    total: int,
    csrf: str,
    query: Mapping[str, str],
    who: str,
    notice: Notice | None = None,
) -> str:
    """The whole status page."""
    now = utcnow()
    status = query.get("status", "")
    options = "".join(
        f"<option value='{s}'{' selected' if s == status else ''}>{s or 'any status'}</option>" for s in ("", *STATUSES)
    )
    checked = " checked" if query.get("problems") else ""
    rows = "".join(_row(m, csrf, now) for m in mailboxes) or "<tr><td colspan=10>No mailbox matches.</td></tr>"
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Mail collector status</title>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{STYLE}</style></head><body>"
        f"<h1>Mail collector status</h1><p>{len(mailboxes)} of {total} mailboxes shown. Signed in: {_e(who)}. "
        f"Page made {_e(_when(now))}.</p>{_notice(notice)}"
        f"<form method=get action={PAGE_ROUTE}><label>Status <select name=status>{options}</select></label> "
        f"<label>Address contains <input name=q value='{_e(query.get('q', ''))}' maxlength=100></label> "
        f"<label><input type=checkbox name=problems value=1{checked}> only mailboxes with a problem</label> "
        "<button>Filter</button></form><table><thead><tr><th>Mailbox</th><th>Mode</th><th>Status</th>"
        "<th>Last success</th><th>Last error and remedy</th><th>Failures in a row</th><th>Refresh token</th>"
        "<th>Checkpoint</th><th>Collected today</th><th>Actions</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></body></html>"
    )


def render_confirm_revoke(address: str, csrf: str, *, app_mode: bool = False) -> str:
    """The confirmation a revoke needs: a second form naming the mailbox, and what the revoke removes."""
    removes = (
        "Its row is deleted from the registry: it is no longer collected. Nothing of it is in Key Vault (app mode); "
        "the app keeps its access to the mailbox in Exchange until an Exchange admin removes it, as the next page "
        "says."
        if app_mode
        else "Its token is deleted from Key Vault and its row from the registry: it is no longer collected, and "
        "authorizing it again needs a new sign-in."
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Revoke a mailbox</title>"
        f"<style>{STYLE}</style></head><body><h1>Revoke {_e(address)}?</h1>"
        f"<p>{removes}</p>"
        f"<form method=post action={PAGE_ROUTE}><input type=hidden name=csrf value='{_e(csrf)}'>"
        f"<input type=hidden name=mailbox value='{_e(address)}'><input type=hidden name=confirm value='{_e(address)}'>"
        "<button name=action value=revoke>Yes, revoke it</button></form>"
        f"<p><a href={PAGE_ROUTE}>No, back to the status page</a></p></body></html>"
    )


def render_reconsent(address: str, expires_at: datetime, link: str) -> str:
    """The owner's page behind a re-consent link: one button, so that a mail scanner opening the link does not
    use it up."""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Authorize the mailbox again</title>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<style>{STYLE}body{{max-width:40rem;margin:3rem auto}}</style></head><body>"
        f"<h1>Authorize {_e(address)} again</h1>"
        "<p>The mail collector can no longer read this mailbox (or its grant is about to expire). Sign in as the "
        "mailbox and accept, and collection goes on where it stopped.</p>"
        f"<p>This link works once and expires {_e(_when(expires_at))}.</p>"
        f"<form method=post action=reconsent><input type=hidden name=link value='{_e(link)}'>"
        "<button>Continue to sign in</button></form></body></html>"
    )


def diagnosis_lines(report: Mapping[str, Any]) -> list[str]:
    """A diagnosis as lines for the page's notice."""
    token = report.get("token", {})
    lines = [f"Mode {report['mode']}, status {report['status']}, checkpoint {report['checkpoint']}"]
    if "error" in token:
        lines.append(f"Token: {token['message']}")
    else:
        lines.append(
            f"Token for {token.get('who', '?')}, tenant {token.get('tenant', '?')}, audience "
            f"{token.get('audience', '?')}, scopes {' '.join(token.get('scopes', [])) or '-'}, roles "
            f"{' '.join(token.get('roles', [])) or '-'}, expires {token.get('expires_at', '?')}"
        )
        if token.get("refresh_token_expires_if_unused"):
            lines.append(f"Refresh token expires if unused: {token['refresh_token_expires_if_unused']}")
    lines.append(f"IMAP login: {report['login']}")
    if report.get("capabilities"):
        lines.append(f"Capabilities: {' '.join(report['capabilities'])}")
    for folder in report.get("folders", []):
        lines.append(f"Folder {folder['name']}" + (f" <- {folder['mark']}" if folder["mark"] else ""))
    if report.get("pending") is not None:
        lines.append(f"Messages above the checkpoint: {report['pending']}")
    lines += [f"Problem: {p}" for p in report.get("problems", [])]
    return lines
