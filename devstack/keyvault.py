"""A Key Vault secrets endpoint for the local stack, speaking the REST API that azure-keyvault-secrets calls.
One module, over 500 lines, on purpose: it is one REST surface read beside Key Vault's reference, in marked sections
(the store, faults and counters, the server, starting it) that no other module uses.

There is no installable Key Vault emulator, so this serves the secrets part of the data plane over HTTPS:
the Bearer challenge, versions, tags, content types, attributes, paging, soft delete with purge and recover,
and Key Vault's error bodies, closely enough that the unmodified ``SecretClient`` works against it.

Where Key Vault is awkward, so is this: deletes and recoveries take a few seconds and answer 409
``ObjectIsBeingDeleted`` / ``ObjectIsBeingRecovered`` meanwhile; a secret with more than 500 versions cannot be
backed up; soft-deleted secrets are kept for the vault's retention (7 days for the deployed vault); with role
assignments (``--rbac``) a caller without the Secrets Officer role gets 403 ``ForbiddenByRbac``, and a new
assignment takes effect only after its propagation delay; more than the documented requests per 10 seconds are
answered 429 with Retry-After. Sources: docs/fidelity.md.

Test hooks live under ``/_control/`` (loopback only, no auth, JSON):
``POST /_control/faults`` queues injected failures (status, Retry-After, delay) for matching requests,
``DELETE /_control/faults`` clears them, ``GET /_control/stats`` counts served reads and writes,
``POST /_control/reset`` clears the counters (``{"secrets": true}``: and every secret, ``{"faults": true}``:
and every fault), ``GET /_control/health`` answers 200, ``GET /_control/secrets`` shows each secret's version count
and state, ``POST /_control/roles`` assigns a role to a principal (object id) with an optional propagation delay,
``POST /_control/settings`` changes the transition time and the throttling limits, ``POST /_control/age`` makes a
secret's versions look older.

Run: ``python -m devstack.keyvault --port 10444 --cert server.pem --key server.key [--state kv.json]``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import ipaddress
import json
import logging
import os
import re
import signal
import ssl
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, quote, unquote, urlsplit

# Named outright: run with ``python -m`` the module is __main__, and log queries want one stable name.
from devstack.faults import FaultQueue
from devstack.tls_http import DispatchingHandler, TlsServer

logger = logging.getLogger("devstack.keyvault")

VAULT_RESOURCE = "https://vault.azure.net"
# Key Vault's first-party application id: v2.0 access tokens carry it as the audience instead of the resource.
VAULT_APP_ID = "cfa8b339-82a2-471a-a3c9-0fc0be7a4093"
ACCEPTED_AUDIENCES = frozenset({VAULT_RESOURCE, VAULT_RESOURCE + "/", VAULT_APP_ID})
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
DEFAULT_PORT = 10444

NAME_PATTERN = re.compile(r"[0-9A-Za-z-]{1,127}")
MAX_VALUE_BYTES = 25 * 1024  # Key Vault's limit for a secret value
MAX_TAGS = 15  # Key Vault refuses more tags per object
MAX_CONTENT_TYPE_CHARS = 255
MAX_PAGE_SIZE = 25  # Key Vault's default page size, and the largest maxresults it accepts
MAX_BODY_BYTES = 256 * 1024  # a set request is a 25 KB value plus JSON; anything far larger is not a client of ours
RECOVERABLE_DAYS = 90  # the soft-delete retention Azure applies by default; the deployed vault sets 7
TRANSITION_SECONDS = 2.0  # how long a delete or a recovery stays in progress (Key Vault: "a few seconds")
MAX_BACKUP_VERSIONS = 500  # Key Vault cannot back up an object with more versions than this
THROTTLE_WINDOW = 10.0  # seconds: Key Vault's limits are per 10 seconds per vault
THROTTLE_LIMITS = {"writes": 300, "all": 4000}  # secret writes, and all transactions, per window
SECRETS_OFFICER = "Key Vault Secrets Officer"
SECRETS_USER = "Key Vault Secrets User"
ROLES = (SECRETS_OFFICER, SECRETS_USER)
RECOVERY_LEVEL = "Recoverable+Purgeable"
NOT_FOUND_HINT = (
    "If you recently deleted this secret you may be able to recover it using the correct recovery command. "
    "For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
)
FAULT_CODES = {429: "Throttled", 500: "InternalServerError", 503: "ServiceUnavailable"}
FAULT_MESSAGES = {
    429: "Request was not processed because too many requests were received. "
    "Reason: A generic throttling rule was applied.",
    500: "An unexpected error occurred while processing the request.",
    503: "The service is temporarily unavailable. Please retry later.",
}

Json = dict[str, Any]


class VaultError(Exception):
    """An error answer in Key Vault's shape: ``{"error": {"code": ..., "message": ...}}``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None, *, inner: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.inner = inner

    def body(self) -> Json:
        error: Json = {"code": self.code, "message": self.message}
        if self.inner:
            error["innererror"] = {"code": self.inner}
        return {"error": error}


def _bad(message: str) -> VaultError:
    return VaultError(400, "BadParameter", message)


def _not_found(name: str, version: str | None = None) -> VaultError:
    ident = f"{name}/{version}" if version else name
    return VaultError(
        404, "SecretNotFound", f"A secret with (name/id) {ident} was not found in this key vault. " + NOT_FOUND_HINT
    )


def _now() -> int:
    return int(time.time())


# --------------------------------------------------------------------------------------------------- the store


class SecretStore:
    """Secrets by case-folded name, each a list of versions (oldest first), plus the soft-deleted ones.

    Every method takes the lock; every change is written to the state file, when there is one, before the
    caller answers, so a restart never forgets an acknowledged write.
    """

    def __init__(
        self,
        state_path: Path | None = None,
        *,
        retention_days: int = RECOVERABLE_DAYS,
        transition_seconds: float = TRANSITION_SECONDS,
    ) -> None:
        self._lock = threading.Lock()
        self._state_path = state_path
        self._active: dict[str, Json] = {}
        self._deleted: dict[str, Json] = {}
        self.retention_days = retention_days
        self.transition_seconds = transition_seconds
        # A delete or a recovery in progress: case-folded name -> ("deleting" | "recovering", monotonic end).
        self._transitions: dict[str, tuple[str, float]] = {}
        if state_path is not None and state_path.exists():
            try:
                state = json.loads(state_path.read_text(encoding="utf-8"))
                self._active = dict(state["secrets"])
                self._deleted = dict(state["deleted"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"state file {state_path} is not a Key Vault stand-in state: {e}") from e

    # --- secrets

    def set(self, vault: str, name: str, body: Json) -> Json:
        value = body.get("value")
        if not isinstance(value, str):
            raise _bad("The parameter 'value' is required and must be a string.")
        if len(value.encode("utf-8")) > MAX_VALUE_BYTES:
            raise _bad(f"Secret value is too large. The maximum size is {MAX_VALUE_BYTES} bytes.")
        now = _now()
        given = {k: v for k, v in _attributes_from(body.get("attributes")).items() if v is not None}
        attributes = {"enabled": True, **given, "created": now, "updated": now}
        version: Json = {"version": uuid.uuid4().hex, "value": value, "attributes": attributes}
        _apply_content_type_and_tags(version, body)
        key = name.lower()
        with self._lock:
            self._refuse_in_transition(key, name)
            if key in self._deleted:
                raise VaultError(
                    409,
                    "Conflict",
                    f"Secret {self._deleted[key]['name']} is currently in a deleted but recoverable state, and its "
                    "name cannot be reused; in this state, the secret can only be recovered or purged.",
                )
            secret = self._active.setdefault(key, {"name": name, "versions": []})
            secret["recoverableDays"] = self.retention_days
            secret["versions"].append(version)
            self._persist()
            return _bundle(vault, secret, version, with_value=True)

    def get(self, vault: str, name: str, version: str | None) -> Json:
        with self._lock:
            secret, found = self._find(name, version)
            if not found["attributes"].get("enabled", True):
                raise VaultError(403, "Forbidden", "Operation get is not allowed on a disabled secret.")
            return _bundle(vault, secret, found, with_value=True)

    def update(self, vault: str, name: str, version: str | None, body: Json) -> Json:
        with self._lock:
            secret, found = self._find(name, version)
            # Built on a copy so that a refused request leaves the version as it was.
            changed = dict(found)
            merged = {**found["attributes"], **_attributes_from(body.get("attributes"))}
            changed["attributes"] = {k: v for k, v in merged.items() if v is not None} | {"updated": _now()}
            _apply_content_type_and_tags(changed, body)
            found.clear()
            found.update(changed)
            self._persist()
            return _bundle(vault, secret, found, with_value=False)

    def list_secrets(self, vault: str) -> list[Json]:
        with self._lock:
            return [
                _item(vault, secret, secret["versions"][-1], versioned=False)
                for _, secret in sorted(self._active.items())
            ]

    def list_versions(self, vault: str, name: str) -> list[Json]:
        with self._lock:
            secret = self._active.get(name.lower()) if self._transition(name.lower()) is None else None
            # Key Vault answers an empty list, not 404, for versions of a name it does not hold.
            if secret is None:
                return []
            return [_item(vault, secret, v, versioned=True) for v in secret["versions"]]

    def delete(self, vault: str, name: str) -> Json:
        key = name.lower()
        with self._lock:
            self._refuse_in_transition(key, name)
            secret = self._active.pop(key, None)
            if secret is None:
                raise _not_found(name)
            now = _now()
            secret["deletedDate"] = now
            secret["scheduledPurgeDate"] = now + self.retention_days * 86400
            self._deleted[key] = secret
            self._begin_transition(key, "deleting")
            self._persist()
            return _deleted_bundle(vault, secret)

    def backup(self, name: str) -> Json:
        """An opaque backup blob; Key Vault refuses a secret with more than 500 versions."""
        with self._lock:
            secret, _ = self._find(name, None)
            if len(secret["versions"]) > MAX_BACKUP_VERSIONS:
                raise _bad(
                    f"Secret {secret['name']} has {len(secret['versions'])} versions; a secret with more than "
                    f"{MAX_BACKUP_VERSIONS} versions cannot be backed up."
                )
            blob = json.dumps({"name": secret["name"], "versions": len(secret["versions"])}).encode()
            return {"value": base64.urlsafe_b64encode(blob).decode().rstrip("=")}

    def age(self, name: str, seconds: int) -> int:
        """Make every version of a secret look ``seconds`` older (a test hook: the app reads a version's age from
        its ``created`` time). Returns the number of versions changed."""
        with self._lock:
            secret, _ = self._find(name, None)
            for version in secret["versions"]:
                for field in ("created", "updated"):
                    version["attributes"][field] -= seconds
            self._persist()
            return len(secret["versions"])

    def summary(self) -> dict[str, Json]:
        """Per secret: versions, enabled versions, and its state (active, deleted, deleting, recovering)."""
        with self._lock:
            result: dict[str, Json] = {}
            for state, secrets in (("active", self._active), ("deleted", self._deleted)):
                for key, secret in secrets.items():
                    versions = secret["versions"]
                    transition = self._transition(key)
                    result[key] = {
                        "name": secret["name"],
                        "versions": len(versions),
                        "enabled": sum(1 for v in versions if v["attributes"].get("enabled", True)),
                        "state": transition or state,
                    }
            return result

    # --- soft-deleted secrets

    def get_deleted(self, vault: str, name: str) -> Json:
        with self._lock:
            self._purge_expired()
            # Until the delete has finished, the deleted secret is not there yet (the SDK's poller waits for it).
            secret = self._deleted.get(name.lower()) if self._transition(name.lower()) is None else None
            if secret is None:
                raise VaultError(404, "SecretNotFound", "Deleted Secret not found")
            return _deleted_bundle(vault, secret)

    def list_deleted(self, vault: str) -> list[Json]:
        with self._lock:
            self._purge_expired()
            items = []
            for key, secret in sorted(self._deleted.items()):
                if self._transition(key) is not None:
                    continue
                item = _item(vault, secret, secret["versions"][-1], versioned=False)
                item.update(_deletion_fields(vault, secret))
                items.append(item)
            return items

    def purge(self, name: str) -> None:
        with self._lock:
            self._refuse_in_transition(name.lower(), name)
            if self._deleted.pop(name.lower(), None) is None:
                raise VaultError(404, "SecretNotFound", "Deleted Secret not found")
            self._persist()

    def recover(self, vault: str, name: str) -> Json:
        key = name.lower()
        with self._lock:
            self._refuse_in_transition(key, name)
            self._purge_expired()
            secret = self._deleted.pop(key, None)
            if secret is None:
                raise VaultError(404, "SecretNotFound", "Deleted Secret not found")
            for field in ("deletedDate", "scheduledPurgeDate"):
                secret.pop(field, None)
            self._active[key] = secret
            self._begin_transition(key, "recovering")
            self._persist()
            return _bundle(vault, secret, secret["versions"][-1], with_value=False)

    def clear(self) -> None:
        with self._lock:
            self._active.clear()
            self._deleted.clear()
            self._transitions.clear()
            self._persist()

    # --- internals (lock held)

    def _transition(self, key: str) -> str | None:
        """The delete or recovery in progress for ``key``, if any (a finished one is forgotten)."""
        current = self._transitions.get(key)
        if current is None:
            return None
        if time.monotonic() >= current[1]:
            del self._transitions[key]
            return None
        return current[0]

    def _begin_transition(self, key: str, kind: str) -> None:
        if self.transition_seconds > 0:
            self._transitions[key] = (kind, time.monotonic() + self.transition_seconds)

    def _refuse_in_transition(self, key: str, name: str) -> None:
        transition = self._transition(key)
        if transition == "deleting":
            raise VaultError(409, "ObjectIsBeingDeleted", f"Secret {name} is currently being deleted.")
        if transition == "recovering":
            raise VaultError(409, "ObjectIsBeingRecovered", f"Secret {name} is currently being recovered.")

    def _purge_expired(self) -> None:
        now = _now()
        expired = [key for key, secret in self._deleted.items() if secret.get("scheduledPurgeDate", now + 1) <= now]
        for key in expired:
            del self._deleted[key]
        if expired:
            self._persist()

    def _find(self, name: str, version: str | None) -> tuple[Json, Json]:
        # While a recovery is in progress the secret is not readable yet (the SDK's poller waits for it).
        secret = self._active.get(name.lower()) if self._transition(name.lower()) is None else None
        if secret is None:
            raise _not_found(name, version)
        if not version:
            return secret, secret["versions"][-1]
        for candidate in secret["versions"]:
            if candidate["version"] == version.lower():
                return secret, candidate
        raise _not_found(name, version)

    def _persist(self) -> None:
        if self._state_path is None:
            return
        data = json.dumps({"secrets": self._active, "deleted": self._deleted}, indent=1, sort_keys=True)
        directory = self._state_path.parent
        directory.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file 0600: it holds secret values, so only the owner may read it.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self._state_path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._state_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _attributes_from(raw: object) -> Json:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad("The parameter 'attributes' must be an object.")
    attributes: Json = {}
    if "enabled" in raw:
        if not isinstance(raw["enabled"], bool):
            raise _bad("The attribute 'enabled' must be a boolean.")
        attributes["enabled"] = raw["enabled"]
    for field in ("nbf", "exp"):
        if field in raw:
            if raw[field] is not None and not isinstance(raw[field], int):
                raise _bad(f"The attribute '{field}' must be a Unix time in seconds.")
            attributes[field] = raw[field]
    return attributes


def _apply_content_type_and_tags(version: Json, body: Json) -> None:
    if "contentType" in body and body["contentType"] is not None:
        content_type = body["contentType"]
        if not isinstance(content_type, str) or len(content_type) > MAX_CONTENT_TYPE_CHARS:
            raise _bad(f"The parameter 'contentType' must be a string of at most {MAX_CONTENT_TYPE_CHARS} chars.")
        version["contentType"] = content_type
    if "tags" in body and body["tags"] is not None:
        tags = body["tags"]
        if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            raise _bad("The parameter 'tags' must be an object of string values.")
        if len(tags) > MAX_TAGS:
            raise _bad(f"The number of tags exceeds the maximum of {MAX_TAGS}.")
        version["tags"] = dict(tags)


def _secret_id(vault: str, secret: Json, version: Json | None) -> str:
    base = f"{vault}/secrets/{secret['name']}"
    return f"{base}/{version['version']}" if version is not None else base


def _public_attributes(secret: Json, version: Json) -> Json:
    days = secret.get("recoverableDays", RECOVERABLE_DAYS)
    return {**version["attributes"], "recoverableDays": days, "recoveryLevel": RECOVERY_LEVEL}


def _bundle(vault: str, secret: Json, version: Json, *, with_value: bool) -> Json:
    bundle: Json = {"id": _secret_id(vault, secret, version), "attributes": _public_attributes(secret, version)}
    if with_value:
        bundle["value"] = version["value"]
    for field in ("contentType", "tags"):
        if field in version:
            bundle[field] = version[field]
    return bundle


def _item(vault: str, secret: Json, version: Json, *, versioned: bool) -> Json:
    item: Json = {
        "id": _secret_id(vault, secret, version if versioned else None),
        "attributes": _public_attributes(secret, version),
    }
    for field in ("contentType", "tags"):
        if field in version:
            item[field] = version[field]
    return item


def _deletion_fields(vault: str, secret: Json) -> Json:
    return {
        "recoveryId": f"{vault}/deletedsecrets/{secret['name']}",
        "deletedDate": secret["deletedDate"],
        "scheduledPurgeDate": secret["scheduledPurgeDate"],
    }


def _deleted_bundle(vault: str, secret: Json) -> Json:
    bundle = _bundle(vault, secret, secret["versions"][-1], with_value=False)
    bundle.update(_deletion_fields(vault, secret))
    return bundle


def _page(items: list[Json], next_url: str, query: dict[str, list[str]]) -> Json:
    """One page of a list answer; ``nextLink`` carries the offset as an opaque ``$skiptoken``."""
    size = MAX_PAGE_SIZE
    if "maxresults" in query:
        try:
            size = int(query["maxresults"][0])
        except ValueError:
            size = 0
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise _bad(f"invalid maxresults: must be between 1 and {MAX_PAGE_SIZE}")
    offset = 0
    if "$skiptoken" in query:
        try:
            offset = int(base64.urlsafe_b64decode(query["$skiptoken"][0].encode()).decode())
        except (ValueError, binascii.Error):
            raise _bad("The skip token is not valid.") from None
    page: Json = {"value": items[offset : offset + size], "nextLink": None}
    if offset + size < len(items):
        token = base64.urlsafe_b64encode(str(offset + size).encode()).decode()
        api_version = query.get("api-version", [""])[0]
        page["nextLink"] = f"{next_url}?api-version={quote(api_version)}&$skiptoken={quote(token)}&maxresults={size}"
    return page


# -------------------------------------------------------------------------------------- faults and counters


@dataclass
class Fault:
    """Answer the next ``count`` matching requests (``-1``: all, until cleared) with ``status`` after
    ``delay_ms``; without a status the request is only delayed, then served."""

    id: str
    status: int | None
    count: int
    retry_after: int | None = None
    method: str | None = None
    name: str | None = None
    delay_ms: int = 0
    served: int = 0

    @classmethod
    def parse(cls, raw: object) -> Fault:
        if not isinstance(raw, dict):
            raise ValueError("a fault is a JSON object")
        unknown = set(raw) - {"status", "count", "retry_after", "method", "name", "delay_ms"}
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        status = raw.get("status")
        if status is not None and (not isinstance(status, int) or not 400 <= status <= 599):
            raise ValueError("status must be an HTTP error status (400-599)")
        count = raw.get("count", 1)
        if not isinstance(count, int) or count == 0 or count < -1:
            raise ValueError("count must be a positive number, or -1 for every request until cleared")
        retry_after = raw.get("retry_after")
        if retry_after is not None and (not isinstance(retry_after, int) or retry_after < 0):
            raise ValueError("retry_after must be whole seconds")
        delay_ms = raw.get("delay_ms", 0)
        if not isinstance(delay_ms, int) or not 0 <= delay_ms <= 600_000:
            raise ValueError("delay_ms must be between 0 and 600000")
        method, name = raw.get("method"), raw.get("name")
        if method is not None and not isinstance(method, str):
            raise ValueError("method must be a string")
        if name is not None and not isinstance(name, str):
            raise ValueError("name must be a string")
        if status is None and not delay_ms:
            raise ValueError("a fault needs a status, a delay_ms, or both")
        return cls(
            id=uuid.uuid4().hex[:12],
            status=status,
            count=count,
            retry_after=retry_after,
            method=method.upper() if method else None,
            name=name.lower() if name else None,
            delay_ms=delay_ms,
        )

    def matches(self, method: str, name: str | None) -> bool:
        if self.method is not None and self.method != method:
            return False
        return self.name is None or (name is not None and self.name == name.lower())


class Faults(FaultQueue[Fault]):
    def snapshot(self) -> list[Json]:
        return [asdict(f) for f in self.faults()]


class Stats:
    """Requests the vault served: reads are GETs, writes are PUT, PATCH, DELETE and POST (recover).

    Challenges (401) and injected faults are counted apart, so that ``writes`` is what took effect.
    ``by_secret`` is keyed by the case-folded secret name.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._reads = 0
            self._writes = 0
            self._challenges = 0
            self._faults = 0
            self._by_secret: dict[str, dict[str, int]] = {}

    def served(self, method: str, name: str | None) -> None:
        kind = "reads" if method == "GET" else "writes"
        with self._lock:
            if kind == "reads":
                self._reads += 1
            else:
                self._writes += 1
            if name is not None:
                counts = self._by_secret.setdefault(name.lower(), {"reads": 0, "writes": 0})
                counts[kind] += 1

    def challenged(self) -> None:
        with self._lock:
            self._challenges += 1

    def faulted(self) -> None:
        with self._lock:
            self._faults += 1

    def snapshot(self) -> Json:
        with self._lock:
            return {
                "reads": self._reads,
                "writes": self._writes,
                "by_secret": {k: dict(v) for k, v in self._by_secret.items()},
                "challenges": self._challenges,
                "faults": self._faults,
            }


class Roles:
    """Azure RBAC on the vault: principal object id -> role, each effective from a moment (propagation)."""

    def __init__(self, assignments: dict[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self._roles: dict[str, tuple[str, float]] = {
            oid.lower(): (role, 0.0) for oid, role in (assignments or {}).items()
        }

    def assign(self, principal: str, role: str | None, delay_seconds: float = 0.0) -> None:
        with self._lock:
            if role is None:
                self._roles.pop(principal.lower(), None)
            else:
                self._roles[principal.lower()] = (role, time.monotonic() + delay_seconds)

    def role(self, principal: str | None) -> str | None:
        with self._lock:
            found = self._roles.get((principal or "").lower())
            if found is None or time.monotonic() < found[1]:
                return None
            return found[0]

    def snapshot(self) -> Json:
        with self._lock:
            now = time.monotonic()
            return {
                oid: {"role": role, "effective_in": max(0.0, round(at - now, 1))}
                for oid, (role, at) in self._roles.items()
            }


class Throttle:
    """Key Vault's per-vault limits over a sliding window; answers how long to wait when one is exceeded."""

    def __init__(self, limits: dict[str, int] | None = None) -> None:
        self._lock = threading.Lock()
        self.limits = dict(limits or THROTTLE_LIMITS)
        self._seen: dict[str, list[float]] = {"writes": [], "all": []}
        self.throttled = 0

    def admit(self, write: bool) -> float | None:
        """None when the request may go on (and is counted); otherwise the seconds until it may."""
        now = time.monotonic()
        kinds = ("writes", "all") if write else ("all",)
        with self._lock:
            for kind in ("writes", "all"):
                self._seen[kind] = [t for t in self._seen[kind] if now - t < THROTTLE_WINDOW]
            for kind in kinds:
                seen = self._seen[kind]
                if len(seen) >= self.limits[kind]:
                    self.throttled += 1
                    return THROTTLE_WINDOW - (now - seen[0])
            for kind in kinds:
                self._seen[kind].append(now)
            return None


# ---------------------------------------------------------------------------------------------- the server


def _claims(token: str) -> Json:
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def _audience_ok(token: str) -> bool:
    """Opaque tokens pass; a JWT must name Key Vault as its audience. Signatures are not checked."""
    parts = token.split(".")
    if len(parts) != 3:
        return True
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return True
    if not isinstance(claims, dict):
        return True
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    return any(a in ACCEPTED_AUDIENCES for a in audiences)


def _phrase_code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.replace(" ", "")
    except ValueError:
        return "Error"


class KeyVaultServer(TlsServer):
    """The HTTPS server; ``url`` is the vault URL to give ``SecretClient``."""

    log_name = "kv"

    def __init__(
        self,
        address: tuple[str, int],
        ssl_context: ssl.SSLContext,
        store: SecretStore,
        *,
        tenant: str | None,
        authority_host: str,
        check_audience: bool,
        roles: Roles | None = None,
    ) -> None:
        super().__init__(address, _Handler, ssl_context)
        self.store = store
        self.faults = Faults()
        self.stats = Stats()
        self.roles = roles  # None: no role checks (a vault in access-policy mode that trusts every caller)
        self.throttle = Throttle()
        self.check_audience = check_audience
        # Without a tenant the challenge names none, and the client's credential keeps its own tenant.
        authorization = f"{authority_host.rstrip('/')}/{tenant or ''}"
        self.challenge = f'Bearer authorization="{authorization}", resource="{VAULT_RESOURCE}"'
        host, port = self.server_address[:2]
        self.url = f"https://{host!s}:{port}"


class _Handler(DispatchingHandler):
    server: KeyVaultServer
    server_version = "KeyVaultStandIn/1.0"

    log = logger
    log_name = "kv"

    def _answer_error(self, error: Exception) -> int | None:
        if isinstance(error, VaultError):
            return self._send(error.status, error.body(), error.headers)
        return None

    def _answer_failure(self) -> int:
        return self._send(500, VaultError(500, "InternalServerError", "stand-in failure").body())

    def _handle(self, path: str) -> int:
        query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
        body = self._read_body()
        if path.startswith("/_control/"):
            return self._control(path, body)

        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.server.stats.challenged()
            error = VaultError(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.")
            return self._send(401, error.body(), {"WWW-Authenticate": self.server.challenge})
        if self.server.check_audience and not _audience_ok(token.strip()):
            self.server.stats.challenged()
            error = VaultError(401, "Unauthorized", "AKV10022: Invalid audience.")
            challenge = self.server.challenge + ', error="invalid_token"'
            return self._send(401, error.body(), {"WWW-Authenticate": challenge})

        if not query.get("api-version", [""])[0]:
            raise _bad("The 'api-version' query parameter is missing.")
        handler, name, version = self._route(path)
        write = self.command != "GET"
        self._authorize(token.strip(), write, path)
        wait = self.server.throttle.admit(write)
        if wait is not None:
            throttled = VaultError(429, "Throttled", FAULT_MESSAGES[429])
            return self._send(429, throttled.body(), {"Retry-After": str(max(1, int(wait + 0.999)))})

        fault = self.server.faults.take(self.command, name)
        if fault is not None:
            if fault.delay_ms:
                time.sleep(fault.delay_ms / 1000)
            if fault.status is not None:
                self.server.stats.faulted()
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                code = FAULT_CODES.get(fault.status) or _phrase_code(fault.status)
                message = FAULT_MESSAGES.get(fault.status, f"Injected fault {fault.id}.")
                return self._send(fault.status, VaultError(fault.status, code, message).body(), headers)

        status, payload = handler(name, version, body, query)
        self.server.stats.served(self.command, name)
        return self._send(status, payload)

    def _authorize(self, token: str, write: bool, path: str) -> None:
        """Azure RBAC: reading needs Secrets User or Officer, anything else Secrets Officer."""
        roles = self.server.roles
        if roles is None:
            return
        claims = _claims(token)
        principal = str(claims.get("oid") or "")
        role = roles.role(principal)
        allowed = role == SECRETS_OFFICER or (role == SECRETS_USER and not write)
        if allowed:
            return
        action = "setSecret/action" if write else "getSecret/action"
        raise VaultError(
            403,
            "Forbidden",
            "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or "
            "role definitions were changed recently, please observe propagation time.\r\n"
            f"Caller: appid={claims.get('appid', '')};oid={principal}\r\n"
            f"Action: 'Microsoft.KeyVault/vaults/secrets/{action}'\r\nResource: '{path}'\r\n"
            "Assignment: (not found)\r\nDecisionReason: 'DeniedWithNoValidRBAC'",
            inner="ForbiddenByRbac",
        )

    def _route(self, path: str) -> tuple[Any, str | None, str | None]:
        """The operation for a path, with the secret name and version it names."""
        parts = [unquote(p) for p in path.split("/")[1:]]
        method = self.command
        collection, rest = parts[0], parts[1:]
        routes: dict[tuple[str, str, int], Any] = {
            ("secrets", "GET", 0): self._list_secrets,
            ("secrets", "PUT", 1): self._set_secret,
            ("secrets", "DELETE", 1): self._delete_secret,
            ("secrets", "GET", 1): self._get_secret,
            ("secrets", "GET", 2): self._get_secret,
            ("secrets", "PATCH", 2): self._update_secret,
            ("deletedsecrets", "GET", 0): self._list_deleted,
            ("deletedsecrets", "GET", 1): self._get_deleted,
            ("deletedsecrets", "DELETE", 1): self._purge_deleted,
            ("deletedsecrets", "POST", 2): self._recover_deleted,
        }
        if rest == [""]:
            rest = []
        if collection == "secrets" and len(rest) == 2 and rest[1] == "versions" and method == "GET":
            return self._list_versions, self._valid_name(rest[0]), None
        if collection == "deletedsecrets" and len(rest) == 2 and rest[1] != "recover":
            raise VaultError(404, "NotFound", f"No route for {method} {path}.")
        if collection == "secrets" and len(rest) == 2 and rest[1] == "backup" and method == "POST":
            return self._backup, self._valid_name(rest[0]), None
        if collection == "secrets" and rest and rest[-1] == "restore" and method == "POST":
            raise VaultError(501, "NotImplemented", "Restore is not served by the local stand-in.")
        handler = routes.get((collection, method, len(rest)))
        if handler is None:
            known = any(c == collection and n == len(rest) for c, _, n in routes)
            if known:
                raise VaultError(405, "MethodNotAllowed", f"The method {method} is not allowed on {path}.")
            raise VaultError(404, "NotFound", f"No route for {method} {path}.")
        name = self._valid_name(rest[0]) if rest else None
        version = rest[1] if len(rest) == 2 and collection == "secrets" else None
        return handler, name, version or None

    @staticmethod
    def _valid_name(name: str) -> str:
        if not NAME_PATTERN.fullmatch(name):
            raise _bad(
                f"The request URI contains an invalid name: {name[:127]}. Secret names may contain only "
                "letters, digits and dashes, and be 1 to 127 characters long."
            )
        return name

    # --- operations: each returns (status, payload)

    def _list_secrets(self, _n: Any, _v: Any, _b: Any, query: dict[str, list[str]]) -> tuple[int, Json]:
        vault = self._vault_url()
        return 200, _page(self.server.store.list_secrets(vault), f"{vault}/secrets", query)

    def _list_versions(self, name: str, _v: Any, _b: Any, query: dict[str, list[str]]) -> tuple[int, Json]:
        vault = self._vault_url()
        items = self.server.store.list_versions(vault, name)
        return 200, _page(items, f"{vault}/secrets/{name}/versions", query)

    def _set_secret(self, name: str, _v: Any, body: Json | None, _q: Any) -> tuple[int, Json]:
        return 200, self.server.store.set(self._vault_url(), name, self._required(body))

    def _get_secret(self, name: str, version: str | None, _b: Any, _q: Any) -> tuple[int, Json]:
        return 200, self.server.store.get(self._vault_url(), name, version)

    def _update_secret(self, name: str, version: str | None, body: Json | None, _q: Any) -> tuple[int, Json]:
        return 200, self.server.store.update(self._vault_url(), name, version, self._required(body))

    def _delete_secret(self, name: str, _v: Any, _b: Any, _q: Any) -> tuple[int, Json]:
        return 200, self.server.store.delete(self._vault_url(), name)

    def _list_deleted(self, _n: Any, _v: Any, _b: Any, query: dict[str, list[str]]) -> tuple[int, Json]:
        vault = self._vault_url()
        return 200, _page(self.server.store.list_deleted(vault), f"{vault}/deletedsecrets", query)

    def _get_deleted(self, name: str, _v: Any, _b: Any, _q: Any) -> tuple[int, Json]:
        return 200, self.server.store.get_deleted(self._vault_url(), name)

    def _purge_deleted(self, name: str, _v: Any, _b: Any, _q: Any) -> tuple[int, None]:
        self.server.store.purge(name)
        return 204, None

    def _recover_deleted(self, name: str, _v: Any, _b: Any, _q: Any) -> tuple[int, Json]:
        return 200, self.server.store.recover(self._vault_url(), name)

    def _backup(self, name: str, _v: Any, _b: Any, _q: Any) -> tuple[int, Json]:
        return 200, self.server.store.backup(name)

    # --- /_control/

    def _control(self, path: str, body: Json | None) -> int:
        if not ipaddress.ip_address(self.client_address[0]).is_loopback:
            return self._send(403, {"error": "control endpoints answer loopback clients only"})
        server = self.server
        match (self.command, path.rstrip("/")):
            case ("GET", "/_control/health"):
                return self._send(200, {"status": "ok"})
            case ("GET", "/_control/stats"):
                return self._send(200, server.stats.snapshot())
            case ("GET", "/_control/faults"):
                return self._send(200, {"faults": server.faults.snapshot()})
            case ("POST", "/_control/faults"):
                try:
                    fault = Fault.parse(body)
                except ValueError as e:
                    return self._send(400, {"error": str(e)})
                server.faults.add(fault)
                return self._send(201, asdict(fault))
            case ("DELETE", "/_control/faults"):
                return self._send(200, {"cleared": server.faults.clear()})
            case ("GET", "/_control/secrets"):
                return self._send(200, {"secrets": server.store.summary()})
            case ("POST", "/_control/age"):
                if not isinstance(body, dict) or not isinstance(body.get("name"), str):
                    return self._send(400, {"error": "name (a secret name) and seconds are required"})
                seconds = body.get("seconds")
                if not isinstance(seconds, int) or isinstance(seconds, bool) or not 0 <= seconds <= 10 * 365 * 86400:
                    return self._send(400, {"error": "seconds must be a whole number of seconds up to ten years"})
                return self._send(200, {"aged": server.store.age(body["name"], seconds)})
            case ("GET", "/_control/roles"):
                return self._send(200, {"roles": None if server.roles is None else server.roles.snapshot()})
            case ("POST", "/_control/roles"):
                error = _role_request_error(body)
                if error or server.roles is None or body is None:
                    return self._send(400, {"error": error or "this vault was started without --rbac"})
                server.roles.assign(body["principal"], body.get("role"), float(body.get("delay_seconds", 0)))
                return self._send(200, {"roles": server.roles.snapshot()})
            case ("POST", "/_control/settings"):
                error = _settings_request_error(body)
                if error or body is None:
                    return self._send(400, {"error": error or "a JSON object is required"})
                if "transition_seconds" in body:
                    server.store.transition_seconds = float(body["transition_seconds"])
                server.throttle.limits.update(body.get("throttle", {}))
                return self._send(
                    200, {"transition_seconds": server.store.transition_seconds, "throttle": server.throttle.limits}
                )
            case ("POST", "/_control/reset"):
                options = body or {}
                server.stats.reset()
                if options.get("secrets"):
                    server.store.clear()
                if options.get("faults"):
                    server.faults.clear()
                return self._send(200, {"reset": True})
        return self._send(404, {"error": f"no control endpoint {self.command} {path}"})

    # --- plumbing

    def _vault_url(self) -> str:
        # Ids carry the host the client used, as a real vault's carry its DNS name.
        host = self.headers.get("Host")
        return f"https://{host}" if host else self.server.url

    def _read_body(self) -> Json | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise VaultError(411, "LengthRequired", "Chunked request bodies are not accepted.")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise _bad("Invalid Content-Length.") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise VaultError(413, "RequestEntityTooLarge", "The request body is too large.")
        if length <= 0:
            return None
        raw = self.rfile.read(length)
        try:
            parsed = json.loads(raw)
        except ValueError:
            raise _bad("The request body is not valid JSON.") from None
        if not isinstance(parsed, dict):
            raise _bad("The request body must be a JSON object.")
        return parsed

    @staticmethod
    def _required(body: Json | None) -> Json:
        if body is None:
            raise _bad("The request body is required.")
        return body

    def _send(self, status: int, payload: Json | None, headers: dict[str, str] | None = None) -> int:
        data = b"" if payload is None else json.dumps(payload).encode("utf-8")
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        return status


# ------------------------------------------------------------------------------------------- starting it


def _role_request_error(body: Json | None) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("principal"), str) or not body["principal"]:
        return "principal (an object id) is required"
    if body.get("role") is not None and body["role"] not in ROLES:
        return f"role must be one of {', '.join(ROLES)}, or null to remove the assignment"
    delay = body.get("delay_seconds", 0)
    if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 3600:
        return "delay_seconds must be between 0 and 3600"
    return ""


def _settings_request_error(body: Json | None) -> str:
    if not isinstance(body, dict) or set(body) - {"transition_seconds", "throttle"}:
        return "settings are transition_seconds and throttle"
    seconds = body.get("transition_seconds", 0)
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not 0 <= seconds <= 600:
        return "transition_seconds must be between 0 and 600"
    limits = body.get("throttle", {})
    if not isinstance(limits, dict) or set(limits) - set(THROTTLE_LIMITS):
        return f"throttle takes {', '.join(THROTTLE_LIMITS)}"
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in limits.values()):
        return "throttle limits must be positive whole numbers"
    return ""


def _require_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.IPv4Address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the Key Vault stand-in listens on IPv4 loopback only, not on {host!r}")


def make_server(
    host: str,
    port: int,
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    *,
    state: str | os.PathLike[str] | None = None,
    tenant: str | None = None,
    authority_host: str = DEFAULT_AUTHORITY_HOST,
    check_audience: bool = True,
    retention_days: int = RECOVERABLE_DAYS,
    transition_seconds: float = TRANSITION_SECONDS,
    secrets_officers: tuple[str, ...] | None = None,
) -> KeyVaultServer:
    """A bound, not yet serving server. Raises ValueError for a non-loopback host or an unreadable state file,
    OSError when the port is taken, ssl.SSLError for a bad certificate or key."""
    _require_loopback(host)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(os.fspath(cert), os.fspath(key))
    store = SecretStore(
        Path(state) if state is not None else None, retention_days=retention_days, transition_seconds=transition_seconds
    )
    if host == "localhost":
        host = "127.0.0.1"
    roles = None if secrets_officers is None else Roles(dict.fromkeys(secrets_officers, SECRETS_OFFICER))
    return KeyVaultServer(
        (host, port),
        context,
        store,
        tenant=tenant,
        authority_host=authority_host,
        check_audience=check_audience,
        roles=roles,
    )


def serve(
    host: str,
    port: int,
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    **options: Any,
) -> tuple[KeyVaultServer, threading.Thread]:
    """Start serving in a daemon thread (port 0 picks a free one); stop with ``server.stop()``.

    Takes the keyword options of ``make_server``, and raises what it raises."""
    server = make_server(host, port, cert, key, **options)
    # A short poll interval makes stop() quick, which keeps a test that starts a server per case fast.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="keyvault-standin", daemon=True
    )
    thread.start()
    return server, thread


def control(
    vault_url: str, method: str, path: str, body: Json | None = None, *, cafile: str | None = None, timeout: float = 10
) -> Json:
    """Call a ``/_control/`` endpoint (``path`` like ``"faults"``) and return its JSON answer.

    Raises urllib.error.HTTPError when the endpoint refuses the call."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 - the URL is the stand-in's own https URL
        f"{vault_url.rstrip('/')}/_control/{path.lstrip('/')}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"} if data is not None else {},
    )
    context = ssl.create_default_context(cafile=cafile)
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
        raw = response.read()
    result: Json = json.loads(raw) if raw else {}
    return result


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devstack.keyvault", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--cert", required=True, help="server certificate chain (PEM)")
    parser.add_argument("--key", required=True, help="server private key (PEM)")
    parser.add_argument("--state", help="JSON file that keeps secrets across restarts (written atomically)")
    parser.add_argument(
        "--tenant",
        default=os.environ.get("ENTRA_TENANT_ID") or os.environ.get("AZURE_TENANT_ID") or None,
        help="tenant named in the Bearer challenge: the SDK asks its credential for a token of this tenant "
        "(default: ENTRA_TENANT_ID or AZURE_TENANT_ID; without one the challenge names no tenant)",
    )
    parser.add_argument(
        "--authority-host",
        default=os.environ.get("ENTRA_AUTHORITY_HOST") or DEFAULT_AUTHORITY_HOST,
        help="authority named in the Bearer challenge",
    )
    parser.add_argument("--accept-any-token", action="store_true", help="accept JWTs whose audience is not Key Vault")
    parser.add_argument(
        "--retention-days", type=int, default=RECOVERABLE_DAYS, help="soft-delete retention (the deployed vault: 7)"
    )
    parser.add_argument(
        "--transition-seconds", type=float, default=TRANSITION_SECONDS, help="how long a delete or recovery takes"
    )
    parser.add_argument(
        "--rbac",
        action="append",
        metavar="OBJECT_ID",
        help="turn on Azure RBAC and give this principal the Secrets Officer role (repeatable); without it every "
        "caller is allowed",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def _stop_on_signal(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        server = make_server(
            args.host,
            args.port,
            args.cert,
            args.key,
            state=args.state,
            tenant=args.tenant,
            authority_host=args.authority_host,
            check_audience=not args.accept_any_token,
            retention_days=args.retention_days,
            transition_seconds=args.transition_seconds,
            secrets_officers=tuple(args.rbac) if args.rbac else None,
        )
    except (ValueError, OSError) as e:
        logger.error("kv cannot start: %s", e)
        return 2
    signal.signal(signal.SIGTERM, _stop_on_signal)
    logger.info("kv listening url=%s state=%s tenant=%s", server.url, args.state or "-", args.tenant or "-")
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
        logger.info("kv stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
