"""What every fault case checks, in one place: nothing lost, byte-exact blobs, duplicates only under the same id,
tokens kept, an error recorded for the mailbox; plus the figures the suite reports (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msal

from devstack import dovecot
from shared import azure_clients
from shared.mailboxes import mailbox_key
from tests.support.stack import Stack


@dataclass
class Tally:
    """One case's figures. ``duplicates``: envelopes beyond the first of their message; all carry the id of the
    first unless the folder's UIDVALIDITY changed (``new_ids``: messages collected again under a new id)."""

    case: str = ""
    delivered: int = 0
    envelopes: int = 0
    lost: int = 0
    duplicates: int = 0
    duplicates_same_id: int = 0
    new_ids: int = 0


@dataclass
class Ledger:
    """The figures of every case run in this session."""

    cases: list[Tally] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # cases that check errors and tokens rather than mail

    def add(self, tally: Tally) -> None:
        self.cases.append(tally)

    def note(self, case: str) -> None:
        self.checks.append(case)

    def totals(self) -> dict[str, int]:
        total = Counter[str]()
        for t in self.cases:
            total.update({k: v for k, v in asdict(t).items() if isinstance(v, int)})
        return {"cases": len(self.cases) + len(self.checks), "mail_cases": len(self.cases), **total}

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"totals": self.totals(), "cases": [asdict(t) for t in self.cases], "checks": self.checks}
        path.write_text(json.dumps(data, indent=2) + "\n")


LEDGER = Ledger()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_delivery(
    services: Any, sent: Iterable[bytes], envelopes: list[dict[str, Any]], *, case: str, new_ids: bool = False
) -> Tally:
    """Assert the guarantees for the mail of one case and record its figures.

    Every sent message is on the queue at least once; every envelope's blob holds exactly the sent bytes; envelopes
    that share an id describe the same message and blob; a message has one id (or, with ``new_ids``, one per
    UIDVALIDITY of its folder).
    """
    sent = list(sent)
    by_sha = {sha256(raw): raw for raw in sent}
    assert len(by_sha) == len(sent), "the case sent the same bytes twice: give each message its own Message-ID"
    seen = Counter(e["sha256"] for e in envelopes)
    lost = sorted(set(by_sha) - set(seen))
    strangers = sorted(set(seen) - set(by_sha))
    assert not strangers, f"{len(strangers)} envelope(s) for mail that was never sent"

    same_id: dict[str, set[tuple[str, str]]] = defaultdict(set)
    ids_of: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for e in envelopes:
        same_id[e["id"]].add((e["sha256"], e["blob"]["name"]))
        ids_of[e["sha256"]].add((e["id"], e["uidvalidity"]))
    mixed = {i: v for i, v in same_id.items() if len(v) > 1}
    assert not mixed, f"one id names different messages or blobs: {mixed}"
    several = {s: v for s, v in ids_of.items() if len(v) > 1}
    if not new_ids:
        assert not several, f"{len(several)} message(s) were sent under more than one id"
    else:
        assert all(len({uidvalidity for _, uidvalidity in v}) == len(v) for v in several.values()), (
            "a message got a second id without a new UIDVALIDITY"
        )

    blobs = {e["blob"]["name"]: e["sha256"] for e in envelopes}
    container = azure_clients.container(services.settings, services.settings.mail_container)

    def exact(item: tuple[str, str]) -> bool:
        name, digest = item
        return bytes(container.download_blob(name).readall()) == by_sha[digest]

    with ThreadPoolExecutor(8) as pool:
        inexact = [name for name, ok in zip(blobs, pool.map(exact, blobs.items()), strict=True) if not ok]
    assert not inexact, f"{len(inexact)} blob(s) differ from the delivered bytes, e.g. {inexact[:3]}"

    tally = Tally(
        case=case,
        delivered=len(by_sha),
        envelopes=len(envelopes),
        lost=len(lost),
        duplicates=len(envelopes) - len(seen),
        duplicates_same_id=len(envelopes) - len(same_id),
        new_ids=sum(len(v) - 1 for v in ids_of.values()),
    )
    LEDGER.add(tally)
    assert not lost, f"{len(lost)} of {len(by_sha)} delivered message(s) never reached the queue"
    return tally


def collect(services: Any, address: str, *, budget: float = 120) -> Any:
    """One collection of ``address`` by ``services``' collector, as the timer or a work item would run it."""
    mailbox = services.registry.get(address)
    return services.collector.collect_mailbox(mailbox, deadline=time.monotonic() + budget)


def stored_version(services: Any, address: str) -> str | None:
    stored = services.tokens._store.load(address)
    return None if stored is None else str(stored.version)


def expire_access_tokens(services: Any, address: str, *, seconds: int = 60) -> str:
    """Make the stored access token of ``address`` nearly expired (a new Key Vault version), so that the next
    collection must renew it with the refresh token. Returns the new version."""
    store = services.tokens._store
    stored = store.load(address)
    assert stored is not None, f"no token stored for {address}"
    data = json.loads(stored.serialized)
    now = int(time.time())
    for entry in data.get("AccessToken", {}).values():
        entry["expires_on"] = str(now + seconds)
        entry["extended_expires_on"] = str(now + seconds)
    cache = msal.SerializableTokenCache()
    cache.deserialize(json.dumps(data))
    saved = store.save(address, cache.serialize(), name=services.registry.get(address).token_secret)
    services.tokens.forget(address)
    return saved.version


def secret_name(address: str) -> str:
    return mailbox_key(address)


def doveadm(stack: Stack, *args: str) -> str:
    """Run doveadm against the stack's Dovecot (for what the devstack helpers do not cover)."""
    result = subprocess.run(
        [shutil.which("doveadm") or "/usr/bin/doveadm", "-c", stack.dovecot_config, *args],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, f"doveadm {' '.join(args[:2])}: {result.stderr.decode(errors='replace')}"
    return result.stdout.decode(errors="replace")


def uids(stack: Stack, address: str, folder: str = "INBOX") -> list[int]:
    """The UIDs in ``folder`` of ``address``, read from Dovecot itself."""
    return dovecot.list_uids(Path(stack.dovecot_config), address, folder)
