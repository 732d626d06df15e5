"""In-memory stand-ins for the collector's seams, for unit tests that need no server.

They keep the contracts of the real parts (``collectors.mail_source``, ``collectors.sinks``, ``shared.lease``,
the Table storage calls the registry makes) and record every step in one shared journal, so that a test can check
the order DESIGN.md guarantees: raw bytes, then envelope, then after-action, then checkpoint. Each can be told to
fail (a TransientError, as the real part raises) or to crash the process (``Crash``, which no ``except Exception``
catches, as a SIGKILL would not be caught).

The integration and fault suites run the same guarantees against the real parts.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import time
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msal
import requests
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableTransactionError

from collectors.collect import Collector, Sinks
from collectors.imap_session import ChunkSink
from collectors.mail_source import Checkpoint
from collectors.memory_budget import MemoryBudget
from collectors.tokens import AccessToken
from shared.after_action import AfterAction, Step
from shared.errors import TransientError
from shared.registry import Mailbox, MailboxRegistry
from shared.settings import Settings, load_settings
from shared.token_store import Removal, SavedCache, StaleTokenError, StoredCache

SETTINGS_ENV = {
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    "KEY_VAULT_URI": "https://kv.vault.azure.net/",
    "ENTRA_TENANT_ID": "contoso.example",
    "ENTRA_CLIENT_ID": "00000000-0000-0000-0000-000000000001",
    "COLLECT_MAX_CONCURRENCY": "2",
}


def settings(**overrides: str) -> Settings:
    return load_settings({**SETTINGS_ENV, **overrides})


class Crash(BaseException):
    """The process dies here: nothing after this point runs, and nothing catches it."""


Journal = list[str]
Fault = Callable[[str], BaseException | None]  # given the event about to happen, what to raise instead (or None)


def never(event: str) -> BaseException | None:
    return None


@dataclass
class Faults:
    """One place to decide which event fails: ``faults.at("send:3", Crash())``."""

    planned: dict[str, BaseException] = field(default_factory=dict)

    def at(self, event: str, error: BaseException) -> None:
        self.planned[event] = error

    def __call__(self, event: str) -> BaseException | None:
        return self.planned.pop(event, None)


# -- the registry's table ----------------------------------------------------------------------------------------


class FakeTable:
    """The TableClient calls MailboxRegistry makes, on a dict; a missing row raises as the real table does."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}

    @staticmethod
    def _plain(entity: Mapping[str, Any]) -> dict[str, Any]:
        # Typed values ("Edm.Int64") come back as plain numbers; enums as their text, as the service stores them.
        return {k: (v[0] if isinstance(v, tuple) else (str(v) if isinstance(v, str) else v)) for k, v in entity.items()}

    def get_entity(self, partition: str, row: str) -> dict[str, Any]:
        try:
            return dict(self.rows[(partition, row)])
        except KeyError:
            raise ResourceNotFoundError("entity not found") from None

    def query_entities(self, query: str) -> list[dict[str, Any]]:
        return [dict(v) for v in self.rows.values()]

    def upsert_entity(self, entity: Mapping[str, Any], mode: Any = None) -> None:
        self.rows[(entity["PartitionKey"], entity["RowKey"])] = self._plain(entity)

    def update_entity(self, entity: Mapping[str, Any], mode: Any = None, **kwargs: Any) -> None:
        key = (entity["PartitionKey"], entity["RowKey"])
        if key not in self.rows:
            raise ResourceNotFoundError("entity not found")
        self.rows[key].update(self._plain(entity))

    def delete_entity(self, partition: str, row: str) -> None:
        self.rows.pop((partition, row), None)

    def submit_transaction(
        self, operations: list[tuple[str, Mapping[str, Any], Mapping[str, Any]]], **kwargs: Any
    ) -> None:
        """Merges only (what the registry sends), all or nothing as the service: a missing row fails them all."""
        for index, (_, entity, _) in enumerate(operations):
            if (entity["PartitionKey"], entity["RowKey"]) not in self.rows:
                error = TableTransactionError(message=f"{index}:The specified resource does not exist.")
                error.status_code = 404
                raise error
        for _, entity, _ in operations:
            self.rows[(entity["PartitionKey"], entity["RowKey"])].update(self._plain(entity))


class _Entity(dict[str, Any]):
    metadata: dict[str, Any]


class FakeFlowTable(FakeTable):
    """The consent flows' table: ETags, conditional updates, and the two queries ConsentService makes."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False
        self._etags: dict[tuple[str, str], int] = {}

    def _check(self) -> None:
        if self.fail:
            from azure.core.exceptions import ServiceRequestError

            raise ServiceRequestError("table unreachable")

    def create_entity(self, entity: Mapping[str, Any]) -> None:
        self._check()
        self.upsert_entity(entity)

    def upsert_entity(self, entity: Mapping[str, Any], mode: Any = None) -> None:
        key = (entity["PartitionKey"], entity["RowKey"])
        self._etags[key] = self._etags.get(key, 0) + 1
        self.rows[key] = dict(entity)

    def get_entity(self, partition: str, row: str) -> _Entity:
        self._check()
        entity = _Entity(super().get_entity(partition, row))
        entity.metadata = {"etag": self._etags[(partition, row)]}
        return entity

    def update_entity(self, entity: Mapping[str, Any], mode: Any = None, **kwargs: Any) -> None:
        key = (entity["PartitionKey"], entity["RowKey"])
        if key in self.rows and "etag" in kwargs and kwargs["etag"] != self._etags[key]:
            raise ResourceModifiedError("412 condition not met")
        super().update_entity(entity, mode)
        self._etags[key] += 1

    def query_entities(self, query: str, **kwargs: Any) -> list[dict[str, Any]]:  # type: ignore[override]
        self._check()
        parameters = kwargs.get("parameters", {})
        rows = list(self.rows.values())
        if "address eq @a" in query:
            return [r for r in rows if r["address"] == parameters["a"] and r["expires_at"] >= parameters["now"]]
        if "expires_at lt @now" in query:
            return [r for r in rows if r["expires_at"] < parameters["now"]]
        return rows


# -- sinks ---------------------------------------------------------------------------------------------------


class FakeRawStore:
    def __init__(self, journal: Journal, fault: Fault = never) -> None:
        self.blobs: dict[str, bytes] = {}
        self.writers: list[FakeWriter] = []
        self._journal = journal
        self._fault = fault

    def url(self, name: str) -> str:
        return f"https://store.example/raw/{name}"

    def put(self, name: str, raw: bytes) -> None:
        uid = int(name.rsplit("/", 1)[1].split(".", maxsplit=1)[0])
        error = self._fault(f"put:{uid}")
        if error is not None:
            raise error
        self.blobs[name] = raw
        self._journal.append(f"put:{uid}")

    def open(self, name: str) -> FakeWriter:
        self.writers.append(writer := FakeWriter(self, name))
        return writer


class FakeWriter:
    """The bytes kept aside until commit, which stores them as ``put`` does (its faults and journal entry too)."""

    def __init__(self, store: FakeRawStore, name: str) -> None:
        self.store = store
        self.name = name
        self.chunks: list[bytes] = []
        self.state = "open"

    def write(self, chunk: bytes) -> None:
        assert self.state == "open", f"write after {self.state}"
        self.chunks.append(chunk)

    def commit(self) -> None:
        assert self.state == "open", f"commit after {self.state}"
        self.store.put(self.name, b"".join(self.chunks))
        self.state = "committed"

    def abort(self) -> None:
        if self.state == "open":
            self.state = "aborted"


class FakeEnvelopeQueue:
    def __init__(self, journal: Journal, fault: Fault = never) -> None:
        self.messages: list[dict[str, Any]] = []
        self._journal = journal
        self._fault = fault

    def send(self, text: str) -> None:
        envelope = json.loads(text)
        error = self._fault(f"send:{envelope['uid']}")
        if error is not None:
            raise error
        self.messages.append(envelope)
        self._journal.append(f"send:{envelope['uid']}")

    def ids(self) -> list[str]:
        return [m["id"] for m in self.messages]


# -- leases ---------------------------------------------------------------------------------------------------


class FakeLease:
    def __init__(self, held: bool) -> None:
        self.held = held
        self.lost = False

    def check(self) -> None:
        if self.lost:
            raise TransientError("the mailbox lease was lost; stopping so that another run can continue")


class FakeLeases:
    def __init__(self) -> None:
        self.taken: set[str] = set()
        self.last: FakeLease | None = None

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[FakeLease]:
        lease = FakeLease(key not in self.taken)
        self.last = lease
        if lease.held:
            self.taken.add(key)
        try:
            yield lease
        finally:
            if lease.held:
                self.taken.discard(key)


# -- tokens -----------------------------------------------------------------------------------------------------


class FakeTokens:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[str] = []

    def access_token(
        self, address: str, *, signed_in_as: str, deadline: float | None = None, secret_name: str = ""
    ) -> AccessToken:
        self.calls.append(address)
        if self.error is not None:
            raise self.error
        return AccessToken("access-token-for-tests", 0.0, renewed=False, saved_at=None)

    def forget(self, address: str) -> None:
        pass


# -- the identity provider and the token store -----------------------------------------------------------------

SIGNED_IN = "support@contoso.example"
SCOPE = "https://outlook.office.com/IMAP.AccessAsUser.All"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _grant(
    cache: msal.TokenCache, access_token: str, refresh_token: str, expires_in: int, username: str = SIGNED_IN
) -> None:
    """What MSAL writes into the cache for a token endpoint answer."""
    now = int(time.time())
    claims = {"iss": "https://login.example/t/v2.0", "sub": "s", "aud": "c", "oid": "o", "tid": "t"}
    id_token = "e30." + _b64({**claims, "preferred_username": username, "exp": now + 3600, "iat": now}) + ".sig"
    cache.add(
        {
            "client_id": "c",
            "scope": [SCOPE],
            "token_endpoint": "https://login.example/t/oauth2/v2.0/token",
            "response": {
                "access_token": access_token,
                "expires_in": expires_in,
                "refresh_token": refresh_token,
                "id_token": id_token,
                "client_info": _b64({"uid": "o", "utid": "t"}),
                "token_type": "Bearer",
            },
        }
    )


class FakeIdentityProvider:
    """Rotates the refresh token on every use and spends the old one; can be unreachable or revoke the grant."""

    def __init__(self) -> None:
        self.valid: set[str] = set()
        self.renewals = 0
        self.unreachable = False
        self.signs_in_as = SIGNED_IN  # the account the next sign-in completes as
        self.codes: set[str] = set()  # authorization codes issued and not yet redeemed

    def consent(self, *, expires_in: int = 3600) -> str:
        cache = msal.SerializableTokenCache()
        self.valid.add("rt-0")
        _grant(cache, "at-0", "rt-0", expires_in)
        return str(cache.serialize())

    def app(self, _settings: Any, cache: msal.TokenCache | None = None) -> Any:
        return _FakeApp(self, cache or msal.SerializableTokenCache())

    def sign_in(self, auth_uri: str) -> dict[str, str]:
        """The browser's part: sign in at ``auth_uri`` and return what Entra posts back to the callback."""
        code = secrets.token_urlsafe(16)
        self.codes.add(code)
        return {"code": code, "state": auth_uri.rsplit("state=", 1)[1], "session_state": "s"}


class _FakeApp:
    def __init__(self, idp: FakeIdentityProvider, cache: msal.TokenCache) -> None:
        self._idp, self._cache = idp, cache

    def get_accounts(self) -> list[dict[str, Any]]:
        return list(self._cache.search(msal.TokenCache.CredentialType.ACCOUNT))

    def acquire_token_silent_with_error(self, scopes: list[str], account: Any, force_refresh: bool) -> Any:
        if self._idp.unreachable:
            raise requests.ConnectionError("login.example unreachable")
        (refresh,) = (e["secret"] for e in self._cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN))
        if refresh not in self._idp.valid:
            return {"error": "invalid_grant", "error_description": "AADSTS50173: revoked", "error_codes": [50173]}
        self._idp.valid.discard(refresh)
        self._idp.renewals += 1
        new = f"rt-{self._idp.renewals}"
        self._idp.valid.add(new)
        _grant(self._cache, f"at-{self._idp.renewals}", new, 3600)
        return {"access_token": f"at-{self._idp.renewals}", "expires_in": 3600}

    def initiate_auth_code_flow(self, scopes: list[str], **kwargs: Any) -> dict[str, Any]:
        state = secrets.token_urlsafe(16)
        return {"state": state, "auth_uri": f"https://login.example/authorize?state={state}", "scope": scopes}

    def acquire_token_by_auth_code_flow(self, flow: dict[str, Any], form: dict[str, str], **kwargs: Any) -> Any:
        if form.get("state") != flow["state"]:
            raise ValueError("state mismatch")
        if self._idp.unreachable:
            raise requests.ConnectionError("login.example unreachable")
        if form.get("code") not in self._idp.codes:
            return {"error": "invalid_grant", "error_description": "AADSTS54005: code redeemed", "error_codes": [54005]}
        self._idp.codes.discard(form["code"])
        self._idp.valid.add("rt-0")
        _grant(self._cache, "at-0", "rt-0", 3600, self._idp.signs_in_as)
        claims = {"preferred_username": self._idp.signs_in_as, "aud": SETTINGS_ENV["ENTRA_CLIENT_ID"]}
        return {"access_token": "at-0", "id_token_claims": claims}


class FakeStore:
    """The TokenCacheStore calls TokenService makes: versions, and writes that fail when told to. Its versions have
    no write time, so every renewed cache is due to be written (as with the stand-in's strict rotation)."""

    def __init__(self) -> None:
        self.versions: list[str] = []
        self.failing_saves = 0
        self.saves: list[float | None] = []  # the deadline of each write
        self.after_load: Callable[[], None] | None = None
        self.removed: list[str] = []  # the addresses revoked

    def load(self, address: str, name: str = "", *, deadline: float | None = None) -> StoredCache | None:
        latest = StoredCache(self.versions[-1], str(len(self.versions))) if self.versions else None
        hook, self.after_load = self.after_load, None
        if hook is not None:
            hook()
        return latest

    def save(
        self,
        address: str,
        serialized: str,
        *,
        based_on: StoredCache | None = None,
        deadline: float | None = None,
        **kwargs: Any,
    ) -> SavedCache:
        self.saves.append(deadline)
        if self.failing_saves:
            self.failing_saves -= 1
            raise TransientError("Key Vault write failed (HTTP 503)")
        if based_on is not None and based_on.version != str(len(self.versions)):
            raise StaleTokenError("Key Vault holds a newer token")
        self.versions.append(serialized)
        return SavedCache("", str(len(self.versions)), None)

    def remove(self, address: str, name: str = "") -> Removal:
        self.removed.append(address)
        existed = bool(self.versions)
        self.versions.clear()
        return Removal(existed=existed, purged=True)

    def refresh_token(self) -> str:
        cache = msal.SerializableTokenCache()
        cache.deserialize(self.versions[-1])
        (entry,) = cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)
        return str(entry["secret"])


# -- the mail source --------------------------------------------------------------------------------------------


@dataclass
class FakeServer:
    """One mailbox's folders on a server: UID -> bytes per folder, one UIDVALIDITY, flags."""

    uidvalidity: int = 7
    folders: dict[str, dict[int, bytes]] = field(default_factory=lambda: {"INBOX": {}})
    seen: set[int] = field(default_factory=set)
    next_uid: int = 1
    on_batch: Callable[[int], None] | None = None  # called with each batch's index before it is answered

    def deliver(self, raw: bytes, folder: str = "INBOX") -> int:
        uid = self.next_uid
        self.next_uid += 1
        self.folders.setdefault(folder, {})[uid] = raw
        return uid


class FakeFolder:
    def __init__(self, server: FakeServer, name: str, last_uid: int, journal: Journal, fault: Fault) -> None:
        self._server = server
        self._name = name
        self._last_uid = last_uid
        self._journal = journal
        self._fault = fault
        self.streamed: list[int] = []  # UIDs handed over in chunks

    @property
    def uidvalidity(self) -> int:
        return self._server.uidvalidity

    @property
    def checkpoint(self) -> Checkpoint:
        return self.checkpoint_after(self._last_uid)

    def sizes(self) -> dict[int, int]:
        box = self._server.folders.get(self._name, {})
        return {uid: len(raw) for uid, raw in box.items() if uid > self._last_uid}

    def fetch_batches(
        self,
        batches: Iterable[list[int]],
        *,
        streamed: Collection[int] = (),
        sink: Callable[[int], ChunkSink] | None = None,
    ) -> Generator[tuple[list[int], dict[int, bytes]]]:
        box = self._server.folders.get(self._name, {})
        for index, batch in enumerate(batches):
            if self._server.on_batch is not None:
                self._server.on_batch(index)
            error = self._fault(f"fetch:{batch[0]}")
            if error is not None:
                raise error
            if batch[0] in streamed and batch[0] in box:
                assert sink is not None and len(batch) == 1
                self.streamed.append(batch[0])
                self._stream(batch[0], box[batch[0]], sink(batch[0]))
                yield batch, {}
                continue
            yield batch, {uid: box[uid] for uid in batch if uid in box}

    def _stream(self, uid: int, raw: bytes, to: ChunkSink) -> None:
        """The bytes in three chunks; the fault ``cut:<uid>`` strikes after the first (a cut in the literal)."""
        third = max(1, len(raw) // 3)
        for start in range(0, len(raw), third):
            if start:
                error = self._fault(f"cut:{uid}")
                if error is not None:
                    raise error
            to.write(raw[start : start + third])

    def fetch_headers(self, ids: Iterable[int]) -> dict[int, bytes]:
        box = self._server.folders.get(self._name, {})
        return {uid: box[uid].split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" for uid in ids if uid in box}

    def apply(self, step: Step) -> None:
        event = f"apply:{step.action}:{','.join(map(str, step.uids))}" + (f":{step.folder}" if step.folder else "")
        error = self._fault(event)
        if error is not None:
            raise error
        box = self._server.folders[self._name]
        if step.action is AfterAction.SEEN:
            self._server.seen.update(step.uids)
        else:
            for uid in step.uids:
                raw = box.pop(uid)
                if step.action is AfterAction.MOVE:
                    self._server.folders.setdefault(step.folder, {})[uid] = raw
        self._journal.append(event)

    def existing(self, ids: Iterable[int]) -> list[int]:
        box = self._server.folders.get(self._name, {})
        return sorted(uid for uid in set(ids) if uid in box)

    def checkpoint_after(self, last_id: int) -> Checkpoint:
        return {"uidvalidity": self._server.uidvalidity, "last_uid": last_id}


class FakeSource:
    def __init__(self, server: FakeServer, journal: Journal, fault: Fault = never) -> None:
        self.server = server
        self._journal = journal
        self._fault = fault
        self.opened = 0

    @contextlib.contextmanager
    def open(self, mailbox: Mailbox, access_token: str, *, login_refused: Any = None) -> Iterator[FakeFolder]:
        self.opened += 1
        last_uid = mailbox.last_uid if mailbox.uidvalidity == self.server.uidvalidity else 0
        yield FakeFolder(self.server, mailbox.options.folder, last_uid, self._journal, self._fault)


# -- a whole collector -------------------------------------------------------------------------------------


class RecordingRegistry(MailboxRegistry):
    """The real registry over a FakeTable, journaling each checkpoint."""

    def __init__(self, table: FakeTable, journal: Journal, fault: Fault = never) -> None:
        super().__init__(table)  # type: ignore[arg-type]
        self._journal = journal
        self._fault = fault

    def record_checkpoint(self, address: str, checkpoint: Mapping[str, int | str], **kwargs: Any) -> None:
        error = self._fault(f"checkpoint:{checkpoint['last_uid']}")
        if error is not None:
            raise error
        super().record_checkpoint(address, checkpoint, **kwargs)
        self._journal.append(f"checkpoint:{checkpoint['last_uid']}")


@dataclass
class World:
    """Everything a collector talks to, in memory; ``collector()`` builds a fresh one (a new process)."""

    faults: Faults = field(default_factory=Faults)
    journal: Journal = field(default_factory=list)
    table: FakeTable = field(default_factory=FakeTable)
    server: FakeServer = field(default_factory=FakeServer)
    leases: FakeLeases = field(default_factory=FakeLeases)
    tokens: FakeTokens = field(default_factory=FakeTokens)
    now: list[float] = field(default_factory=lambda: [0.0])
    budget: MemoryBudget | None = None  # the collectors' shared budget (None: each its own, from the settings)

    def __post_init__(self) -> None:
        self.raw = FakeRawStore(self.journal, self.faults)
        self.queue = FakeEnvelopeQueue(self.journal, self.faults)
        self.source = FakeSource(self.server, self.journal, self.faults)
        self.registry = RecordingRegistry(self.table, self.journal, self.faults)

    def clock(self) -> float:
        return self.now[0]

    def collector(self) -> Collector:
        return Collector(
            settings(),
            registry=self.registry,
            tokens=self.tokens,
            source=self.source,
            sinks=Sinks(raw=self.raw, envelopes=self.queue),
            leases=self.leases,
            clock=self.clock,
            memory_budget=self.budget,
        )
