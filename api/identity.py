"""Who is calling an admin route, for ``consented_by`` and the audit lines."""

from __future__ import annotations

import os

import azure.functions as func

from shared.audit import FUNCTION_KEY

PRINCIPAL_HEADER = "x-ms-client-principal-name"


def acting_admin(req: func.HttpRequest) -> str:
    """The signed-in admin's name when App Service authentication fronts the app, else "function key".

    Only then is the header trusted: the platform sets WEBSITE_AUTH_ENABLED and replaces any client-sent
    X-MS-CLIENT-PRINCIPAL-* header with its own. Without it any caller holding the key could name anyone.
    """
    if os.environ.get("WEBSITE_AUTH_ENABLED", "").lower() == "true":
        name = str(req.headers.get(PRINCIPAL_HEADER) or "").strip()
        if name:
            return name[:200]
    return FUNCTION_KEY
