"""Admin routes: list, add (app mode), read, change and revoke registered mailboxes (JSON, function key)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import azure.functions as func

from api.identity import acting_admin
from api.operations import reconsent_url
from api.pages import json_answer
from api.statuses import bad_request, conflict, mailbox_refused, not_found, service_failure
from collectors.app_mailboxes import MailboxExistsError
from collectors.operations import DELEGATED, mode_of
from collectors.services import Services, get_services
from shared.errors import CollectorError, NotFoundError
from shared.mailboxes import InvalidMailboxError, normalize_address
from shared.registry import Mailbox, MailboxMode

MAX_JSON_BYTES = 8 * 1024

blueprint = func.Blueprint()  # type: ignore[no-untyped-call]  # the library leaves its __init__ untyped


@blueprint.route(route="mailboxes", methods=["GET"])
def list_mailboxes(req: func.HttpRequest) -> func.HttpResponse:
    """Every registered mailbox with its status, checkpoint and last outcome (JSON)."""
    try:
        return json_answer(200, [m.to_public() for m in get_services().registry.list()])
    except CollectorError as e:
        return service_failure(e)


def _reconsent_fields(req: func.HttpRequest, services: Services, mailbox: Mailbox) -> dict[str, Any]:
    """For a delegated mailbox: a fresh re-consent link for its owner (signed, single use, 7 days). The
    needs-re-consent alert points here."""
    if mode_of(mailbox) != DELEGATED:
        return {"reconsent_link": None}
    link = services.operations.reconsent_link(mailbox.address, admin=acting_admin(req))
    parts = urlsplit(req.url)
    return {
        "reconsent_link": reconsent_url(f"{parts.scheme}://{parts.netloc}", link.value),
        "reconsent_link_expires_at": link.expires_at.isoformat(),
    }


def _options_patch(body: bytes) -> dict[str, Any]:
    """The PATCH body as a JSON object; raises ValueError saying what is wrong with it."""
    try:
        changes = json.loads(body or b"{}")
    except RecursionError:  # a few KB of "[[[[" nest deeper than the parser's recursion limit
        raise ValueError("the body nests too deeply") from None
    if not isinstance(changes, dict):
        raise ValueError("the body must be a JSON object")
    return changes


ADD_FIELDS = ("address", "mode", "tenant", "options")


@blueprint.route(route="mailboxes", methods=["POST"])
def add_mailbox(req: func.HttpRequest) -> func.HttpResponse:
    """Add an app-mode mailbox: JSON {"address", "mode": "app", "tenant" (optional), "options" (optional)}.

    Access is proven first (app token, IMAP login as the mailbox, SELECT of the folder); a refusal answers with the
    step that is missing (403 or 502, its remedy filled in) and stores nothing. 201 with the new row otherwise.
    """
    body = req.get_body()
    if len(body) > MAX_JSON_BYTES:
        return json_answer(413, {"error": "too_large"})
    try:
        request = _options_patch(body)
        unknown = sorted(set(request) - set(ADD_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(unknown)}; expected {', '.join(ADD_FIELDS)}")
        mode, tenant, options = request.get("mode", ""), request.get("tenant", ""), request.get("options", {})
        if mode == MailboxMode.DELEGATED:
            raise ValueError(
                "delegated mailboxes are added by signing in as the mailbox: open /api/mailboxes/{address}/authorize"
            )
        if mode != MailboxMode.APP:
            raise ValueError('mode must be "app" (delegated mailboxes are added through their authorize link)')
        if not isinstance(request.get("address"), str) or not isinstance(tenant, str):
            raise ValueError("address and tenant must be text")
        if not isinstance(options, dict):
            raise ValueError("options must be a JSON object")
        services = get_services()
        address = normalize_address(request["address"], allowed_domains=services.settings.allowed_domains)
        added = services.app_mailboxes.add(address, options, tenant=tenant, admin=acting_admin(req))
        return json_answer(201, added.to_public())
    except MailboxExistsError as e:
        return conflict(str(e))
    except (InvalidMailboxError, ValueError) as e:
        return bad_request(str(e))
    except CollectorError as e:
        return mailbox_refused(e)


@blueprint.route(route="mailboxes/{address}", methods=["GET", "PATCH", "DELETE"])
def mailbox(req: func.HttpRequest) -> func.HttpResponse:
    """GET: status. PATCH: options as JSON (folder, after_action, move_to, max_messages, max_bytes). DELETE: revoke."""
    try:
        address = normalize_address(req.route_params.get("address", ""))
        services = get_services()
        if req.method == "DELETE":
            revoked = services.consent.revoke(address, admin=acting_admin(req))
            return json_answer(
                200 if revoked.existed else 404,
                {
                    "mailbox": address,
                    "revoked": revoked.existed,
                    "key_vault": revoked.in_key_vault,
                    "entra_id": revoked.at_entra,
                },
            )
        current = services.registry.find(address)
        if current is None:
            return not_found(address)
        if req.method == "GET":
            return json_answer(200, {**current.to_public(), **_reconsent_fields(req, services, current)})
        body = req.get_body()
        if len(body) > MAX_JSON_BYTES:
            return json_answer(413, {"error": "too_large"})
        changed = services.consent.change_options(address, _options_patch(body), admin=acting_admin(req))
        return json_answer(200, changed.to_public())
    except NotFoundError:  # revoked between the read and the change
        return not_found(req.route_params.get("address", ""))
    except (InvalidMailboxError, ValueError) as e:
        return bad_request(str(e))
    except CollectorError as e:
        return service_failure(e)
