"""What every benchmark shares: the local stack, an isolated workspace (own queue, containers, tables and mailbox
addresses), consents through the real flow, fast mail delivery, and the result rows of the final table.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"  # scratch output (ignored by git)
KB = 1024
MB = 1024 * 1024
CONSENT_THREADS = 8  # concurrent consents: the Entra stand-in and Azurite are single-threaded Node processes
_WORD_TEXT = (
    "invoice printer ticket password reset urgent please help account mailbox outlook calendar meeting laptop "
    "network vpn access server error screen update license order delivery refund request thanks regards team"
)
WORDS = tuple(_WORD_TEXT.split())


# -- results ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the final table. ``ratio`` is the figure over the baseline, or None when there is none."""

    bench: str
    figure: str
    baseline: str
    ratio: float | None
    goal: str
    met: bool
    note: str = ""

    @property
    def verdict(self) -> str:
        return "met" if self.met else "MISSED"


def table(rows: Sequence[Row]) -> str:
    """A Markdown table: readable in a terminal and pasteable into RESULTS.md."""
    header = ("benchmark", "figure", "baseline", "ratio", "goal", "verdict")
    lines = [
        (r.bench, r.figure, r.baseline, "-" if r.ratio is None else f"{r.ratio:.2f}x", r.goal, r.verdict) for r in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(fmt(line) for line in lines)
    notes = [f"- {r.bench}: {r.note}" for r in rows if r.note]
    return "\n".join([*out, "", *notes] if notes else out)


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


@dataclass
class Timer:
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


# -- mail -------------------------------------------------------------------------------------------------------


def make_message(size: int, *, serial: int, rng: random.Random) -> bytes:
    """A plausible support mail of about ``size`` bytes with CRLF line ends (as IMAP serves it).

    Up to 64 KB it is a plain text mail; larger ones carry a base64 attachment, like a screenshot or a log file.
    """
    headers = (
        f"From: Customer {serial} <customer{serial}@example.org>\r\n"
        "To: Support <support@example.test>\r\n"
        f"Subject: Ticket {serial}: {' '.join(rng.choices(WORDS, k=6))}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\n"
        "Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
    )
    if size <= 64 * KB:
        body = _text(size - len(headers) - 60, rng)
        return (headers + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body).encode()
    boundary = f"b-{uuid.uuid4().hex}"
    text = _text(2 * KB, rng)
    attachment_bytes = max(0, (size - len(headers) - len(text) - 600) * 3 // 4 * 76 // 78)
    encoded = base64.encodebytes(rng.randbytes(attachment_bytes)).replace(b"\n", b"\r\n").decode()
    return (
        headers
        + f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        + f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
        + f'--{boundary}\r\nContent-Type: application/octet-stream; name="capture-{serial}.bin"\r\n'
        + f'Content-Disposition: attachment; filename="capture-{serial}.bin"\r\n'
        + f"Content-Transfer-Encoding: base64\r\n\r\n{encoded}"
        + f"--{boundary}--\r\n"
    ).encode()


def _text(size: int, rng: random.Random) -> str:
    lines = []
    total = 0
    while total < size:
        line = " ".join(rng.choices(WORDS, k=11))
        lines.append(line)
        total += len(line) + 2
    return "\r\n".join(lines) + "\r\n"


# -- the stack and a workspace ------------------------------------------------------------------------------------


def stack_info() -> dict[str, Any]:
    """The shared local stack (started when it is not running; a running one is reused and left running)."""
    from devstack import stack

    return stack.start()


def _session(info: dict[str, Any]) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.verify = info["ca_bundle"]
    return session


class Workspace:
    """App settings and services on this workspace's own queue, containers and tables; its mailboxes are new
    Dovecot users and new Entra stand-in accounts. ``close`` removes all of it again."""

    def __init__(self, info: dict[str, Any], name: str, **overrides: str) -> None:
        from collectors.services import build_services
        from devstack.stack import isolated_settings
        from shared.settings import load_settings

        self.info = info
        self.tag = f"b{uuid.uuid4().hex[:8]}"
        self.name = name
        env = isolated_settings(
            info,
            self.tag,
            COLLECT_TIME_BUDGET_SECONDS="3600",  # a benchmark run must not stop at the default budget
        )
        env.update(overrides)
        self.env = env
        self.settings = load_settings(env)
        self.services = build_services(self.settings)
        self.addresses: list[str] = []
        self._local = threading.local()

    def address(self, label: str) -> str:
        return f"{self.tag}-{label}@example.test"

    # consent ---------------------------------------------------------------------------------------------------

    def consent(self, addresses: Sequence[str], *, threads: int = CONSENT_THREADS, **options: str) -> float:
        """Authorize each mailbox through the real flow (start, the stand-in's sign-in pages, callback).

        Returns the seconds it took. Raises on the first consent that fails.
        """
        timer = Timer()
        with ThreadPoolExecutor(max(1, min(threads, len(addresses)))) as pool:
            list(pool.map(lambda a: self._consent_one(a, options), addresses))
        return timer.elapsed()

    def _consent_one(self, address: str, options: dict[str, str]) -> None:
        from shared.errors import TransientError

        try:
            self._consent_once(address, options)
        except TransientError:
            # A loaded machine: the stand-in closed a kept-alive connection as it was reused. One new flow.
            self._consent_once(address, options)

    def _consent_once(self, address: str, options: dict[str, str]) -> None:
        from tests.support.signin import sign_in

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = _session(self.info)
        redirect_uri = f"{self.info['host_origin']}/api/auth/callback"
        auth_uri = self.services.consent.start(address, redirect_uri=redirect_uri, options=options)
        fields = sign_in(
            auth_uri,
            login=address,
            password=self.info["user_password"],
            redirect_uri=redirect_uri,
            session=session,
        )
        self.services.consent.complete(fields)
        self.addresses.append(address)

    # mail -----------------------------------------------------------------------------------------------------

    def deliver(self, address: str, messages: Iterable[bytes]) -> int:
        """Deliver into the mailbox's INBOX the way Maildir delivery works, then let Dovecot index it."""
        count = deliver_maildir(self.info, address, messages)
        sync_mailboxes(self.info, [address])
        return count

    def reset_checkpoint(self, address: str) -> None:
        """Make the next run collect the whole folder again (the messages stay on the server)."""
        uidvalidity = self.services.registry.get(address).uidvalidity
        # An empty per-folder map: the row's own columns count, and they say "from the start".
        self.services.registry.record_checkpoint(
            address, {"uidvalidity": uidvalidity, "last_uid": 0, "folder_checkpoints": ""}
        )

    def clear_queue(self) -> None:
        from shared import azure_clients

        azure_clients.queue(self.settings, self.settings.mail_queue).clear_messages()

    # cleanup --------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Delete this workspace's queues, containers, tables, Key Vault secrets and Maildirs (best effort)."""
        from bench.empty_side import purge_secrets, remove_storage

        for left in remove_storage(self.settings):  # cleanup goes on; the names are unique anyway
            say(f"cleanup of {self.name}: {left}")
        if not self.info.get("own_key_vault"):  # a private vault goes away with its process
            purge_secrets(self.settings, list(self.addresses))
        mail_root = Path(self.info["dovecot_config"]).parent / "mail"
        for home in mail_root.glob(f"{self.tag}-*"):
            shutil.rmtree(home, ignore_errors=True)


# -- delivery -----------------------------------------------------------------------------------------------------


def _mail_account() -> tuple[int, int]:
    import pwd

    from devstack.dovecot import MAIL_USER

    account = pwd.getpwnam(MAIL_USER)
    return account.pw_uid, account.pw_gid


_serial = iter(range(1, 1 << 62))
_serial_lock = threading.Lock()


def deliver_maildir(info: dict[str, Any], address: str, messages: Iterable[bytes]) -> int:
    """Write each message into ``<home>/Maildir/tmp`` and rename it into ``new``, as Maildir delivery works.

    About a hundred times faster than ``doveadm save`` per message (no process per message). The file names
    carry the size (``S=``, and ``W=``: the files already have CRLF line ends), so Dovecot need not read a
    message to learn its size. Needs write access to the Dovecot mail root (the stack runs Dovecot as root).
    """
    uid, gid = _mail_account()
    home = Path(info["dovecot_config"]).parent / "mail" / address.lower()
    maildir = home / "Maildir"
    for folder in (home, maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        if not folder.exists():
            folder.mkdir(mode=0o700)
            os.chown(folder, uid, gid)
    count = 0
    for raw in messages:
        with _serial_lock:
            serial = next(_serial)
        name = f"{int(time.time())}.M{serial}P{os.getpid()}.bench,S={len(raw)},W={len(raw)}"
        temporary = maildir / "tmp" / name
        temporary.write_bytes(raw)
        os.chown(temporary, uid, gid)
        temporary.chmod(0o600)
        temporary.rename(maildir / "new" / name)
        count += 1
    return count


def sync_mailboxes(info: dict[str, Any], addresses: Sequence[str]) -> None:
    """Let Dovecot index newly delivered mail now, outside any measured section (one doveadm for all users)."""
    doveadm = shutil.which("doveadm") or "/usr/bin/doveadm"
    with tempfile.NamedTemporaryFile("w", suffix=".users", delete=False) as users:
        users.write("\n".join(a.lower() for a in addresses) + "\n")
    try:
        subprocess.run(
            [doveadm, "-c", info["dovecot_config"], "mailbox", "status", "-F", users.name, "messages", "INBOX"],
            check=True,
            capture_output=True,
            timeout=600,
        )
    finally:
        os.unlink(users.name)


# -- a private Key Vault endpoint ---------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnKeyVault:
    """A Key Vault stand-in of this benchmark run's own, so that its counters are ours alone (the shared one is
    reset and used by tests running meanwhile). ``with OwnKeyVault(info) as info:`` gives the stack description
    with this vault's URI."""

    def __init__(self, info: dict[str, Any]) -> None:
        self._info = info
        self._process: subprocess.Popen[bytes] | None = None
        self._folder = tempfile.TemporaryDirectory(prefix="bench-kv-")

    def __enter__(self) -> dict[str, Any]:
        import ssl
        import urllib.request

        info = self._info
        port = free_port()
        log = Path(self._folder.name) / "keyvault.log"
        command = [
            sys.executable, "-m", "devstack.keyvault", "--host", "127.0.0.1", "--port", str(port),
            "--cert", info["tls_cert"], "--key", info["tls_key"],
            "--tenant", info["tenant_id"], "--authority-host", info["entra_origin"], "--log-level", "WARNING",
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        uri = f"https://localhost:{port}"
        context = ssl.create_default_context(cafile=info["ca"])
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/_control/health", timeout=2, context=context) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"own Key Vault stand-in did not start: {log.read_text()[-1000:]}") from None
                time.sleep(0.2)
        return {**info, "key_vault_uri": uri, "own_key_vault": True}

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._folder.cleanup()
