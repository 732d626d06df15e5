"""Operations routes: the status page and its actions, the owner's re-consent link, and the admin JSON routes for
pause, resume, diagnose, replay and re-consent links.

The status page is signed into with the function key once: GET /api/status?code=KEY (or App Service
authentication) sets a signed session cookie (HttpOnly, SameSite=Strict, path /api/ops) and redirects to
/api/ops, so the key leaves the address bar and never appears in the page or its links. /api/ops is anonymous to
the host and checks the cookie itself; its POST actions also need the session's CSRF token and, when the browser
sends one, an Origin of this app.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import azure.functions as func

from api import status_page
from api.consent import callback_uri
from api.identity import PRINCIPAL_HEADER, acting_admin
from api.pages import SECURITY_HEADERS, json_answer, page
from api.statuses import bad_request, consent_failure, link_refused, not_found, service_failure
from collectors.services import Services, get_services
from shared.audit import FUNCTION_KEY
from shared.errors import CollectorError, NotFoundError, RunOutcome
from shared.mailboxes import InvalidMailboxError, normalize_address
from shared.registry import MailboxMode, MailboxStatus
from shared.signed_links import InvalidLink

logger = logging.getLogger(__name__)

SESSION_COOKIE = "ops_session"
SESSION_PURPOSE = "ops-session"
CSRF_PURPOSE = "ops-csrf"
SESSION_TTL = timedelta(hours=8)  # a working day; then the admin opens /api/status with the key again
MAX_FORM_BYTES = 4 * 1024
PAGE_PATH = f"/api/{status_page.PAGE_ROUTE}"
_QUEUE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
ACTIONS = ("collect", "pause", "resume", "link", "test", "diagnose", "revoke")
COLLECT_NOW_BUDGET = 60.0  # seconds: the page waits for the collection; the caps leave the rest for the timer

blueprint = func.Blueprint()  # type: ignore[no-untyped-call]  # the library leaves its __init__ untyped


def _headers(form_targets: str = "'self'") -> dict[str, str]:
    return {
        **SECURITY_HEADERS,
        "Content-Security-Policy": f"default-src 'none'; style-src 'unsafe-inline'; form-action {form_targets}; "
        "frame-ancestors 'none'",
        # The page's own form posts carry its Origin (no-referrer would make it "null"); nothing leaves the origin.
        "Referrer-Policy": "same-origin",
    }


def _html(status: int, body: str, headers: Mapping[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        body, status_code=status, mimetype="text/html", charset="utf-8", headers=dict(headers or _headers())
    )


def _origin(req: func.HttpRequest) -> str:
    parts = urlsplit(req.url)
    return f"{parts.scheme}://{parts.netloc}"


def _session_cookie(req: func.HttpRequest, value: str) -> str:
    secure = "; Secure" if urlsplit(req.url).scheme == "https" else ""
    return (
        f"{SESSION_COOKIE}={value}; Path={PAGE_PATH}; Max-Age={int(SESSION_TTL.total_seconds())}; HttpOnly; "
        f"SameSite=Strict{secure}"
    )


def _new_session(services: Services, req: func.HttpRequest) -> str:
    value, _ = services.signer.sign(SESSION_PURPOSE, acting_admin(req), ttl=SESSION_TTL)
    return value


def _session(services: Services, req: func.HttpRequest) -> tuple[str, str] | None:
    """(who, session nonce) of a valid session cookie, or None."""
    try:
        cookie: SimpleCookie = SimpleCookie(req.headers.get("cookie", ""))
    except CookieError:
        return None
    morsel = cookie.get(SESSION_COOKIE)
    if morsel is None:
        return None
    try:
        signed = services.signer.check(morsel.value, SESSION_PURPOSE)
    except InvalidLink:
        return None
    return signed.subject, signed.nonce


def _signed_out() -> func.HttpResponse:
    return page(
        401,
        "Sign in to the status page",
        "This page needs a session. Sessions last eight hours.",
        "Open /api/status with the function key (?code=...) or through App Service authentication.",
    )


@blueprint.route(route="status", methods=["GET"])
def status_sign_in(req: func.HttpRequest) -> func.HttpResponse:
    """Function key (or App Service authentication): start a page session and go to the page without the key."""
    try:
        services = get_services()
        cookie = _session_cookie(req, _new_session(services, req))
    except CollectorError as e:
        return service_failure(e)
    return func.HttpResponse(status_code=303, headers={**_headers(), "Location": PAGE_PATH, "Set-Cookie": cookie})


def _query(req: func.HttpRequest) -> dict[str, str]:
    query = {name: str(req.params.get(name, ""))[:100] for name in ("status", "q", "problems")}
    if query["status"] not in ("", *status_page.STATUSES):
        query["status"] = ""
    return query


def _render(services: Services, who: str, nonce: str, query: Mapping[str, str], notice: Any = None) -> str:
    everything = services.registry.list()
    shown = status_page.select(
        everything, status=query.get("status", ""), text=query.get("q", ""), problems=bool(query.get("problems"))
    )
    csrf = services.signer.mac(CSRF_PURPOSE, nonce)
    return status_page.render_status(shown, total=len(everything), csrf=csrf, query=query, who=who, notice=notice)


@blueprint.route(route=status_page.PAGE_ROUTE, methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
def status_page_route(req: func.HttpRequest) -> func.HttpResponse:
    """The status page (GET, filters in the query) and its actions (POST form with the CSRF token)."""
    try:
        services = get_services()
        session = _session(services, req)
        headers = _headers()
        if session is None and req.headers.get(PRINCIPAL_HEADER) and acting_admin(req) != FUNCTION_KEY:
            value = _new_session(services, req)  # App Service authentication fronts the app: it vouches
            headers["Set-Cookie"] = _session_cookie(req, value)
            signed = services.signer.check(value, SESSION_PURPOSE)
            session = (signed.subject, signed.nonce)
        if session is None:
            return _signed_out()
        who, nonce = session
        if req.method == "GET":
            return _html(200, _render(services, who, nonce, _query(req)), headers)
        return _action(services, req, who, nonce)
    except CollectorError as e:
        return page(503, "Temporarily unavailable", e.describe(), "Reload the page in a minute.")


def _form(req: func.HttpRequest) -> dict[str, str]:
    body = req.get_body()
    if len(body) > MAX_FORM_BYTES:
        raise ValueError("the form is larger than expected")
    fields = parse_qsl(body.decode("utf-8", "strict"), keep_blank_values=True, max_num_fields=10)
    form = dict(fields)
    if len(form) != len(fields):
        raise ValueError("the form repeats a field")
    return form


def _action(services: Services, req: func.HttpRequest, who: str, nonce: str) -> func.HttpResponse:
    origin = req.headers.get("origin")
    if origin and origin != _origin(req):
        logger.warning("status page action refused reason=foreign_origin")
        return page(403, "Refused", "The form was not sent from this app's status page.")
    try:
        form = _form(req)
    except (UnicodeDecodeError, ValueError) as e:
        return page(400, "Malformed request", str(e))
    if not hmac.compare_digest(form.get("csrf", ""), services.signer.mac(CSRF_PURPOSE, nonce)):
        logger.warning("status page action refused reason=csrf")
        return page(403, "Refused", "The form is stale or was not made by this page.", "Reload the status page.")
    action = form.get("action", "")
    if action not in ACTIONS:
        return page(400, "Unknown action", "The status page does not offer that action.")
    try:
        address = normalize_address(form.get("mailbox", ""))
    except InvalidMailboxError as e:
        return page(400, "Invalid mailbox", str(e))
    if action == "revoke" and form.get("confirm") != address:
        mailbox = services.registry.find(address)
        app_mode = mailbox is not None and mailbox.mode == MailboxMode.APP
        csrf = services.signer.mac(CSRF_PURPOSE, nonce)
        return _html(200, status_page.render_confirm_revoke(address, csrf, app_mode=app_mode))
    notice = _do(services, req, action, address, who)
    logger.info("status page action=%s mailbox=%s ok=%s", action, address, str(notice.ok).lower())
    return _html(200, _render(services, who, nonce, {}, notice))


def _do(services: Services, req: func.HttpRequest, action: str, address: str, who: str) -> status_page.Notice:
    """Carry out one page action and say how it went."""
    notice = status_page.Notice
    try:
        if action == "pause":
            services.operations.pause(address, admin=who)
            return notice(f"{address} is paused: it is not collected, and its token is kept alive.")
        if action == "resume":
            services.operations.resume(address, admin=who)
            return notice(f"{address} is collected again from its checkpoint.")
        if action == "link":
            link = services.operations.reconsent_link(address, admin=who)
            return notice(
                f"Send this link to the owner of {address}. It works once, until {link.expires_at:%Y-%m-%d %H:%M} "
                "UTC, and opens the sign-in without the function key.",
                link=reconsent_url(_origin(req), link.value),
            )
        if action == "revoke":
            revoked = services.consent.revoke(address, admin=who)
            if not revoked.existed:
                return notice(f"{address} was not registered.", ok=False)
            return notice(f"{address} is revoked.", detail=[revoked.in_key_vault, revoked.at_entra])
        if action == "collect":
            mailbox = services.registry.get(address)
            if mailbox.status != MailboxStatus.ACTIVE:
                return notice(f"{address} is {mailbox.status}: only active mailboxes are collected.", ok=False)
            result = services.collector.collect_mailbox(
                mailbox, deadline=time.monotonic() + COLLECT_NOW_BUDGET, asked=True
            )
            ok = result.outcome in (RunOutcome.OK, RunOutcome.BUSY)  # busy: a run already collecting it
            text = f"{address}: {result.outcome}, {result.messages} messages collected"
            return notice(
                text + (" (more next run)" if result.more else "") + ".",
                ok=ok,
                detail=[result.error] * bool(result.error),
            )
        report = _diagnosis(services, address)
        if action == "test":
            verdict = "works" if report["ok"] else "has a problem"
            return notice(f"The connection to {address} {verdict}: IMAP login {report['login']}.", ok=report["ok"],
                          detail=[f"Problem: {p}" for p in report["problems"]])  # fmt: skip
        return notice(f"Diagnosis of {address}", ok=report["ok"], detail=status_page.diagnosis_lines(report))
    except NotFoundError:
        return notice(f"{address} is not registered.", ok=False)
    except ValueError as e:
        return notice(str(e), ok=False)
    except CollectorError as e:
        return notice(f"{action} failed: {e.describe()}", ok=False)


def reconsent_url(origin: str, value: str) -> str:
    return f"{origin}/api/reconsent?link={quote(value, safe='')}"


# -- the owner's re-consent link (anonymous: the link itself is the credential) -------------------------------


@blueprint.route(route="reconsent", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
def reconsent(req: func.HttpRequest) -> func.HttpResponse:
    """GET: the owner's page with one button (link checked, not used). POST: use the link, go to Entra's sign-in."""
    try:
        services = get_services()
        if req.method == "GET":
            value = str(req.params.get("link", ""))
            signed, mailbox = services.operations.check_reconsent_link(value)
            authority = urlsplit(services.settings.authority_host)
            targets = f"'self' {authority.scheme}://{authority.netloc}"
            return _html(
                200, status_page.render_reconsent(mailbox.address, signed.expires_at, value), _headers(targets)
            )
        value = _form(req).get("link", "")
        url = services.operations.open_reconsent_link(value, redirect_uri=callback_uri(req))
        return func.HttpResponse(status_code=303, headers={**_headers(), "Location": url})
    except InvalidLink as e:
        logger.info("reconsent link refused reason=%s", str(e).split(":")[0][:60].replace(" ", "_"))
        return link_refused(e)
    except (UnicodeDecodeError, ValueError) as e:
        return page(400, "Malformed request", str(e))
    except Exception as e:
        return consent_failure(e)


# -- admin JSON routes (function key) ---------------------------------------------------------------------------


def _address(req: func.HttpRequest) -> str:
    return normalize_address(req.route_params.get("address", ""))


Route = Callable[[func.HttpRequest], func.HttpResponse]


def _json_errors(fn: Route) -> Route:
    """The admin routes' answers for a missing mailbox (404), bad input (400) and a failing service (503)."""

    def wrapper(req: func.HttpRequest) -> func.HttpResponse:
        try:
            return fn(req)
        except NotFoundError:
            return not_found(req.route_params.get("address", ""))
        except (InvalidMailboxError, ValueError) as e:
            return bad_request(str(e))
        except CollectorError as e:
            return service_failure(e)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@blueprint.route(route="mailboxes/{address}/pause", methods=["POST"])
@_json_errors
def pause_mailbox(req: func.HttpRequest) -> func.HttpResponse:
    """Stop collecting the mailbox; its token is kept alive."""
    return json_answer(200, get_services().operations.pause(_address(req), admin=acting_admin(req)).to_public())


@blueprint.route(route="mailboxes/{address}/resume", methods=["POST"])
@_json_errors
def resume_mailbox(req: func.HttpRequest) -> func.HttpResponse:
    """Collect a paused mailbox again from its checkpoint."""
    return json_answer(200, get_services().operations.resume(_address(req), admin=acting_admin(req)).to_public())


@blueprint.route(route="mailboxes/{address}/reconsent-link", methods=["POST"])
@_json_errors
def reconsent_link(req: func.HttpRequest) -> func.HttpResponse:
    """A new signed, single-use re-consent link for the mailbox's owner (?days=1..30, default 7)."""
    days = str(req.params.get("days", "7"))
    if not days.isdigit() or not 1 <= int(days) <= 30:
        raise ValueError("days must be a whole number from 1 to 30")
    link = get_services().operations.reconsent_link(
        _address(req), admin=acting_admin(req), ttl=timedelta(days=int(days))
    )
    return json_answer(
        200, {"reconsent_link": reconsent_url(_origin(req), link.value), "expires_at": link.expires_at.isoformat()}
    )


@blueprint.route(route="mailboxes/{address}/diagnose", methods=["GET"])
@_json_errors
def diagnose_mailbox(req: func.HttpRequest) -> func.HttpResponse:
    """Token claims, IMAP login and capabilities, folders and messages waiting (never a token)."""
    return json_answer(200, _diagnosis(get_services(), _address(req)))


def _diagnosis(services: Services, address: str) -> dict[str, Any]:
    # Imported on use, as the CLI does: a timer's cold start never needs the diagnosis or the replay.
    from collectors.diagnose import diagnose

    return diagnose(services.settings, services.registry, services.collector.token_for, address).to_public()


def _moment(value: Any, name: str) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        return datetime.fromisoformat(str(value)[:40])
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 date and time with a time zone") from None


@blueprint.route(route="mailboxes/{address}/replay", methods=["POST"])
@_json_errors
def replay_mailbox(req: func.HttpRequest) -> func.HttpResponse:
    """Queue the mailbox's envelopes again from the archive. JSON body: {"since", "until"} or {"ids": [...]}, and
    optionally "queue" (another queue, for a new consumer)."""
    body = req.get_body()
    if len(body) > 256 * 1024:
        return json_answer(413, {"error": "too_large"})
    try:
        data = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        raise ValueError("the body must be a JSON object") from None
    if not isinstance(data, dict) or set(data) - {"since", "until", "ids", "queue"}:
        raise ValueError("the body must be a JSON object with since/until or ids, and optionally queue")
    ids = data.get("ids")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
        raise ValueError("ids must be a list of envelope ids")
    if ids is None and not data.get("since"):
        raise ValueError("give since (and optionally until), or ids")
    queue_name = str(data.get("queue") or "")
    if queue_name and not _QUEUE_NAME.fullmatch(queue_name):
        raise ValueError("queue must be a storage queue name (3-63 lower-case letters, digits and dashes)")
    from collectors.replay import replay  # imported on use, as the diagnosis is

    services = get_services()
    mailbox = services.registry.get(_address(req))
    result = replay(
        mailbox,
        container=services.mail_container(),
        queue=services.mail_queue(queue_name),
        since=_moment(data.get("since"), "since"),
        until=_moment(data.get("until"), "until"),
        ids=ids,
    )
    logger.info("replay requested mailbox=%s who=%s queued=%d", mailbox.address, acting_admin(req), len(result.queued))
    return json_answer(200, result.to_public())
