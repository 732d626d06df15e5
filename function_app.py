"""Azure Functions entry point (v2 programming model). It only wires triggers to the plain code in ``collectors``.

Routes (under /api):
  GET    mailboxes                       list mailboxes with their status          (function key)
  GET    mailboxes/{address}             one mailbox's status                      (function key)
  PATCH  mailboxes/{address}             change its folder, after-action or caps   (function key)
  DELETE mailboxes/{address}             revoke: delete its token and row          (function key)
  GET    mailboxes/{address}/authorize   start the consent flow                    (function key)
  POST   auth/callback                   Entra's form post; anonymous because the OAuth "code" parameter
                                         collides with the function key's "code"
Timer: collect_mail on %COLLECT_SCHEDULE% (six-field NCRONTAB) collects the due mailboxes in-process or, when there
are more than one instance should take, puts one work item per mailbox on %WORK_QUEUE_NAME% for collect_work.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func

from collectors.consent import ConsentProblem
from collectors.pages import SECURITY_HEADERS, render
from collectors.services import get_services
from shared import redaction
from shared.errors import CollectorError, ConfigurationError
from shared.mailboxes import InvalidMailboxError, normalize_address
from shared.registry import MailboxOptions

logger = logging.getLogger("function_app")
redaction.install()
# The Azure SDKs log every HTTP request at INFO; keep Application Insights for the app's own lines.
logging.getLogger("azure").setLevel(logging.WARNING)
# At DEBUG imapclient logs every line it reads, whole messages included: mail content stays out of the logs.
logging.getLogger("imapclient").setLevel(logging.INFO)

MAX_FORM_BYTES = 32 * 1024  # Entra's form post holds a code, a state and a session id: a few KB at most
MAX_JSON_BYTES = 8 * 1024
CALLBACK_ROUTE = "auth/callback"

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


def _page(status: int, title: str, message: str, next_step: str = "", *, ok: bool = False) -> func.HttpResponse:
    return func.HttpResponse(
        render(title, message, next_step, ok=ok),
        status_code=status,
        mimetype="text/html",
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )


def _json(status: int, body: Any) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, default=str), status_code=status, mimetype="application/json", headers=SECURITY_HEADERS
    )


def _failure_page(error: Exception) -> func.HttpResponse:
    if isinstance(error, ConsentProblem):
        return _page(error.status, error.title, error.detail, error.next_step)
    if isinstance(error, ConfigurationError):
        logger.error("consent failed: %s", error)
        return _page(500, "The app is not configured correctly", str(error), error.remedy)
    if isinstance(error, CollectorError):
        logger.warning("consent failed: %s", error)
        return _page(
            503,
            "Temporarily unavailable",
            "A service the app depends on did not answer. Nothing was stored.",
            "Wait a minute and open the authorize link again.",
        )
    logger.exception("consent failed unexpectedly: %s", type(error).__name__)
    return _page(500, "Unexpected error", "Nothing was stored.", "Try again; if it persists, check the app's logs.")


def _redirect_uri(req: func.HttpRequest) -> str:
    configured = get_services().settings.redirect_uri
    if configured:
        return configured
    parts = urlsplit(req.url)
    return f"{parts.scheme}://{parts.netloc}/api/{CALLBACK_ROUTE}"


def _admin_name(req: func.HttpRequest) -> str:
    # Set by App Service authentication when it fronts the app; absent with a function key.
    return req.headers.get("x-ms-client-principal-name", "") or "function-key"


@app.route(route="mailboxes/{address}/authorize", methods=["GET"])
def authorize_mailbox(req: func.HttpRequest) -> func.HttpResponse:
    """Start the consent flow for a mailbox and redirect the browser to Entra ID."""
    params = dict(req.params)
    params.pop("code", None)  # the function key
    delegate = params.pop("delegate", "")
    try:
        auth_uri = get_services().consent.start(
            req.route_params.get("address", ""),
            redirect_uri=_redirect_uri(req),
            delegate=delegate,
            options=params,
            admin=_admin_name(req),
        )
    except Exception as e:
        return _failure_page(e)
    return func.HttpResponse(status_code=302, headers={**SECURITY_HEADERS, "Location": auth_uri})


@app.route(route=CALLBACK_ROUTE, methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def auth_callback(req: func.HttpRequest) -> func.HttpResponse:
    """Entra's form post: redeem the code, check the account, keep the token cache in Key Vault."""
    body = req.get_body()
    if len(body) > MAX_FORM_BYTES:
        return _page(413, "Request too large", "The sign-in response is larger than expected.")
    if not req.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return _page(415, "Unexpected request", "The callback accepts only Entra ID's form post.")
    try:
        fields = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body), max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        return _page(400, "Malformed request", "The sign-in response could not be read.")
    form = dict(fields)
    if len(form) != len(fields):
        return _page(400, "Malformed request", "The sign-in response repeats a field.")
    try:
        result = get_services().consent.complete(form)
    except Exception as e:
        return _failure_page(e)
    verb = "re-authorized" if result.reconsent else "authorized"
    return _page(
        200,
        "Mailbox authorized",
        f"{result.address} is {verb} (signed in as {result.signed_in_as}). Its token is stored in Key Vault.",
        "Nothing else to do: new mail is collected at the next scheduled run.",
        ok=True,
    )


@app.route(route="mailboxes", methods=["GET"])
def list_mailboxes(req: func.HttpRequest) -> func.HttpResponse:
    """Every registered mailbox with its status, checkpoint and last outcome (JSON)."""
    try:
        return _json(200, [m.to_public() for m in get_services().registry.list()])
    except CollectorError as e:
        return _json(503, {"error": e.error_class, "message": e.describe()})


def _mailbox_address(req: func.HttpRequest) -> str:
    return normalize_address(req.route_params.get("address", ""))


@app.route(route="mailboxes/{address}", methods=["GET", "PATCH", "DELETE"])
def mailbox(req: func.HttpRequest) -> func.HttpResponse:
    """GET: status. PATCH: options as JSON (folder, after_action, move_to, max_messages, max_bytes). DELETE: revoke."""
    try:
        address = _mailbox_address(req)
        services = get_services()
        if req.method == "DELETE":
            existed = services.consent.revoke(address)
            return _json(200 if existed else 404, {"mailbox": address, "revoked": existed})
        current = services.registry.find(address)
        if current is None:
            return _json(404, {"error": "not_found", "message": f"{address} is not authorized"})
        if req.method == "GET":
            return _json(200, current.to_public())
        body = req.get_body()
        if len(body) > MAX_JSON_BYTES:
            return _json(413, {"error": "too_large"})
        try:
            changes = json.loads(body or b"{}")
        except RecursionError:  # a few KB of "[[[[" nest deeper than the parser's recursion limit
            raise ValueError("the body nests too deeply") from None
        if not isinstance(changes, dict):
            raise ValueError("the body must be a JSON object")
        options = MailboxOptions.from_mapping(changes, current.options)
        services.registry.set_options(address, options)
        return _json(200, services.registry.get(address).to_public())
    except (InvalidMailboxError, ValueError) as e:
        return _json(400, {"error": "bad_request", "message": str(e)})
    except CollectorError as e:
        return _json(503, {"error": e.error_class, "message": e.describe()})


@app.timer_trigger(schedule="%COLLECT_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=True)
def collect_mail(timer: func.TimerRequest) -> None:
    """Collect every active mailbox. Failures are recorded per mailbox; the run itself only fails on configuration."""
    if timer.past_due:
        logger.warning("collection run is past due; collecting now")
    services = get_services()
    services.credential_check.run()
    due = services.collector.due_mailboxes()
    if services.collector.fan_out_needed(len(due)):
        services.collector.fan_out(due, services.work_queue())
        return
    results = services.collector.run(due)
    failed = [r for r in results if r.outcome not in ("ok", "busy", "deferred")]
    logger.info(
        "collect run mailboxes=%d messages=%d failed=%d",
        len(results),
        sum(r.messages for r in results),
        len(failed),
    )


@app.queue_trigger(arg_name="item", queue_name="%WORK_QUEUE_NAME%", connection="AzureWebJobsStorage")
def collect_work(item: func.QueueMessage) -> None:
    """Collect the one mailbox a work item names (fan-out across instances; the lease keeps each mailbox single)."""
    get_services().collector.collect_work_item(item.get_body().decode("utf-8", errors="replace"))
