"""A private Dovecot instance that stands in for Exchange Online IMAP, and helpers to seed and inspect its mail.

``write_config`` renders ``dovecot.conf.in`` into ``<run_dir>/dovecot/``; the stack then runs
``dovecot -F -c <that file>``. Logins use SASL XOAUTH2 or OAUTHBEARER with an access token from the Entra
stand-in: Dovecot's oauth2 passdb checks the JWT signature against the stand-in's public key, the issuer, the
audience and the expiry locally. Like Exchange, it goes by the account, not by the sign-in name: the token's
``x_stand_in_mailbox`` (the account's primary SMTP address) opens that mailbox; any other ``user=`` (an alias, or a
mailbox the account has Full Access to) must be in the access list, keyed by the token's ``oid``, which also maps
the name to its mailbox. Mailboxes (Maildir, one per primary address) appear on first use.

The first login after a start spawns the auth and imap processes and loads their crypto, which can take seconds
on a loaded machine: call ``warm_up`` once before timing anything.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import imaplib
import json
import os
import pwd
import re
import shutil
import ssl
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

TEMPLATE = Path(__file__).resolve().parent / "dovecot.conf.in"
MAIL_USER = "mail"  # an existing unprivileged system user; Dovecot refuses to run mail processes as root
IMAP_AUDIENCE = "https://outlook.office.com"  # the `aud` Exchange expects in delegated IMAP tokens
# App tokens for the scope https://outlook.office365.com/.default carry the resource as it was asked for.
IMAP_APP_AUDIENCE = "https://outlook.office365.com"
IMAP_APP_ROLE = "IMAP.AccessAsApp"
APP_GRANTS_FILE = "app-grants"  # under the instance's folder: the mailbox permissions of applications
SOCKET_DIR_MAX = 60  # characters; unix socket paths under base_dir must stay below the kernel's 108
DOVEADM_TIMEOUT = 30.0  # seconds; doveadm starts its own auth lookup and the first one is slow
WARM_UP_USER = "warm-up@devstack.invalid"


class DovecotError(RuntimeError):
    """doveadm or the private instance failed; the message carries doveadm's own words."""


def _escape_identifier(value: str) -> str:
    # Dovecot escapes '/' and '%' in kid and azp before it builds the key dictionary path.
    return value.replace("%", "%25").replace("/", "%2f")


def _check_traversable(path: Path, uid: int, gid: int) -> None:
    """Mail processes run as MAIL_USER: every ancestor of the mail root must let that user through."""
    for folder in [path, *path.parents]:
        mode = folder.stat()
        if mode.st_uid == uid and mode.st_mode & stat.S_IXUSR:
            continue
        if mode.st_gid == gid and mode.st_mode & stat.S_IXGRP:
            continue
        if mode.st_mode & stat.S_IXOTH:
            continue
        raise PermissionError(
            f"{folder} does not let user {MAIL_USER!r} through (mode {stat.filemode(mode.st_mode)}); "
            "put the run folder somewhere traversable or chmod o+x that folder"
        )


def _base_dir(root: Path) -> Path:
    candidate = root / "run"
    if len(str(candidate)) <= SOCKET_DIR_MAX:
        return candidate
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"dovecot-{digest}"


def write_config(
    run_dir: Path,
    *,
    port: int,
    tls_cert: Path,
    tls_key: Path,
    signing_public_key: Path,
    signing_kid: str,
    issuer: str,
    other_issuers: Sequence[str] = (),
) -> Path:
    """Render the instance's configuration under ``run_dir/dovecot/`` and return the path of dovecot.conf.

    ``other_issuers``: the token issuers of further tenants (a multitenant app's customers) that Exchange, like this
    instance, accepts as well. Idempotent: rendering again rewrites the files and keeps the mail and the grant list.
    Raises PermissionError when the mail user cannot reach ``run_dir``.
    """
    account = pwd.getpwnam(MAIL_USER)
    root = (run_dir / "dovecot").resolve()
    mail_root = root / "mail"
    keys = root / "keys"
    key_folder = keys / "default" / "RS256"  # <azp or default>/<alg>/: the access tokens carry no azp
    for folder in (root, root / "state", key_folder):
        folder.mkdir(parents=True, exist_ok=True)
    mail_root.mkdir(exist_ok=True)
    os.chown(mail_root, account.pw_uid, account.pw_gid)
    mail_root.chmod(0o700)
    _check_traversable(mail_root.parent, account.pw_uid, account.pw_gid)

    for folder in (keys, keys / "default", key_folder):
        folder.chmod(0o755)
    key_file = key_folder / _escape_identifier(signing_kid)
    key_file.write_bytes(Path(signing_public_key).read_bytes())
    key_file.chmod(0o644)

    issuers = " ".join([issuer, *other_issuers])
    oauth2_conf = root / "dovecot-oauth2.conf.ext"
    oauth2_conf.write_text(
        "# Local validation of the Entra stand-in's access tokens (no introspection round trip).\n"
        "introspection_mode = local\n"
        f"local_validation_key_dict = fs:posix:prefix={keys}/\n"
        "# The account's primary SMTP address (Exchange finds the mailbox from the oid; Dovecot cannot look it up).\n"
        "username_attribute = x_stand_in_mailbox\n"
        f"issuers = {issuers}\n"
        "# With local validation, client_id is matched against the token's aud: only IMAP tokens get in.\n"
        f"client_id = {IMAP_AUDIENCE}\n"
    )
    oauth2_delegate_conf = root / "dovecot-oauth2-delegate.conf.ext"
    oauth2_delegate_conf.write_text(
        "# Delegated tokens for another name than the account's own mailbox: the user check compares a constant;\n"
        "# the access list that follows decides, by the account's object id (oid), which names it may open.\n"
        "introspection_mode = local\n"
        f"local_validation_key_dict = fs:posix:prefix={keys}/\n"
        "username_attribute = oid\n"
        "username_format = account\n"
        f"issuers = {issuers}\n"
        f"client_id = {IMAP_AUDIENCE}\n"
        "pass_attrs = imap_account=FullAccess/%{oauth2:oid}\n"
    )
    oauth2_app_conf = root / "dovecot-oauth2-app.conf.ext"
    oauth2_app_conf.write_text(
        "# App-only tokens: no user claim to compare, so the user check compares a constant; the grant list that\n"
        "# follows decides which mailboxes the application (its service principal, the token's oid) may open.\n"
        "introspection_mode = local\n"
        f"local_validation_key_dict = fs:posix:prefix={keys}/\n"
        "username_attribute = oid\n"
        "username_format = application\n"
        f"issuers = {issuers}\n"
        f"client_id = {IMAP_APP_AUDIENCE}\n"
        "# The grant list is keyed by <role>/<service principal>/<mailbox>: a token without the role (the\n"
        "# application permission has no admin consent: no roles claim) matches no grant. Dovecot 2.3 cannot\n"
        "# read the JSON array roles, so the stand-in repeats it as text in x_stand_in_roles.\n"
        "pass_attrs = imap_app=%{oauth2:x_stand_in_roles}/%{oauth2:oid}\n"
    )
    grants = root / APP_GRANTS_FILE
    if not grants.exists():
        grants.write_text("")
    grants.chmod(0o644)

    base_dir = _base_dir(root)
    # A penalty socket left by an older configuration would be found and refused: see dovecot.conf.in.
    (base_dir / "anvil-auth-penalty").unlink(missing_ok=True)
    values = {
        "base_dir": str(base_dir),
        "state_dir": str(root / "state"),
        "instance_name": f"devstack-imap-{port}",
        "log_path": "/dev/stderr",
        "tls_cert": str(Path(tls_cert).resolve()),
        "tls_key": str(Path(tls_key).resolve()),
        "oauth2_conf": str(oauth2_conf),
        "oauth2_app_conf": str(oauth2_app_conf),
        "oauth2_delegate_conf": str(oauth2_delegate_conf),
        "app_grants": str(grants),
        "mail_user": MAIL_USER,
        "mail_group": MAIL_USER,
        "mail_uid": str(account.pw_uid),
        "mail_gid": str(account.pw_gid),
        "mail_root": str(mail_root),
        "port": str(port),
    }
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    leftover = re.findall(r"@[a-z_]+@", text)
    if leftover:
        raise ValueError(f"dovecot.conf.in has placeholders without values: {leftover}")
    config = root / "dovecot.conf"
    config.write_text(text)
    return config


def _doveadm(config: Path, *args: str, stdin: bytes | None = None) -> str:
    doveadm = shutil.which("doveadm") or "/usr/bin/doveadm"
    try:
        result = subprocess.run(
            [doveadm, "-c", str(config), *args],
            input=stdin,
            capture_output=True,
            timeout=DOVEADM_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise DovecotError(f"doveadm {args[0]} did not finish within {DOVEADM_TIMEOUT:.0f} s") from e
    if result.returncode != 0:
        message = (result.stderr or result.stdout).decode(errors="replace").strip()
        raise DovecotError(f"doveadm {' '.join(args[:3])} failed ({result.returncode}): {message}")
    return result.stdout.decode(errors="replace")


def deliver(config: Path, user: str, raw: bytes, folder: str = "INBOX") -> None:
    """Store ``raw`` in ``user``'s ``folder`` as delivered mail (new, unseen).

    IMAP serves messages with CRLF line ends and without NUL bytes (Dovecot sends 0x80 instead): give CRLF input
    without NULs to get the same bytes back from ``BODY[]``.
    Raises DovecotError when the folder does not exist or doveadm fails.
    """
    _doveadm(config, "save", "-u", user, "-m", folder, stdin=raw)


def create_folder(config: Path, user: str, name: str) -> None:
    """Create a folder (``/`` separates levels). Raises DovecotError if it exists already."""
    _doveadm(config, "mailbox", "create", "-u", user, name)


def list_folders(config: Path, user: str) -> list[str]:
    """The user's folders, INBOX included."""
    return [line for line in _doveadm(config, "mailbox", "list", "-u", user).splitlines() if line]


def list_uids(config: Path, user: str, folder: str = "INBOX") -> list[int]:
    """UIDs of the messages in ``folder``, ascending (expunged ones are gone)."""
    out = _doveadm(config, "search", "-u", user, "mailbox", folder, "all")
    return sorted(int(line.split()[1]) for line in out.splitlines() if line.strip())


def list_flags(config: Path, user: str, folder: str = "INBOX") -> dict[int, set[str]]:
    """System and keyword flags of each message in ``folder``, by UID."""
    out = _doveadm(config, "fetch", "-u", user, "uid flags", "mailbox", folder, "all")
    flags: dict[int, set[str]] = {}
    uid = 0
    for line in out.splitlines():
        if line.startswith("uid: "):
            uid = int(line[5:])
            flags[uid] = set()
        elif line.startswith("flags:"):
            flags[uid] = set(line[6:].split())
    return flags


def _grants_path(config: Path) -> Path:
    return Path(config).parent / APP_GRANTS_FILE


def _grant_line(service_principal_id: str, mailbox: str) -> str:
    # passwd-file: user:password:uid:gid:gecos:home:shell:extra fields. No password to check: the token was.
    return f"{IMAP_APP_ROLE}/{service_principal_id.lower()}/{mailbox.lower()}:::::::nopassword=y"


def grant_app(config: Path, service_principal_id: str, *mailboxes: str) -> None:
    """Give an application's service principal Full Access to ``mailboxes`` (Add-MailboxPermission).

    ``service_principal_id`` is the object id in the application's tokens (``oid``). Idempotent. Returns once
    Dovecot sees the change.
    """
    for value in (service_principal_id, *mailboxes):
        if not re.fullmatch(r"[A-Za-z0-9@._+-]+", value):
            raise ValueError(f"{value!r}: only letters, digits and @._+- in a grant")
    _change_grants(config, add=[_grant_line(service_principal_id, mailbox) for mailbox in mailboxes])


def revoke_app(config: Path, service_principal_id: str, *mailboxes: str) -> None:
    """Take the permission back (Remove-MailboxPermission). Succeeds when there was none; returns once Dovecot sees
    the change."""
    _change_grants(config, remove=[_grant_line(service_principal_id, mailbox) for mailbox in mailboxes])


def account_oid(address: str) -> str:
    """The object id the Entra stand-in gives the account whose primary SMTP address is ``address``."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailto:{address.lower()}"))


def _access_lines(account: str, mailbox: str, names: Sequence[str]) -> list[str]:
    for value in (account, mailbox, *names):
        if not re.fullmatch(r"[A-Za-z0-9._+-]+@[A-Za-z0-9.-]+", value):
            raise ValueError(f"{value!r}: an address of letters, digits and @._+- only")
    owner = account_oid(account)
    return [f"FullAccess/{owner}/{name.lower()}:::::::nopassword=y user={mailbox.lower()}" for name in names]


def add_aliases(config: Path, mailbox: str, *aliases: str) -> None:
    """Give ``mailbox`` further SMTP addresses (proxyAddresses): its own account may log in with ``user=<alias>``
    and lands in the one mailbox. Idempotent; returns once Dovecot sees the change."""
    _change_grants(config, add=_access_lines(mailbox, mailbox, aliases))


def grant_full_access(config: Path, delegate: str, mailbox: str, *aliases: str) -> None:
    """Give the account whose primary address is ``delegate`` Full Access to ``mailbox`` (Add-MailboxPermission
    -AccessRights FullAccess), by its primary address and ``aliases``. Idempotent; returns once Dovecot sees it."""
    _change_grants(config, add=_access_lines(delegate, mailbox, [mailbox, *aliases]))


def grant_full_access_to_all(config: Path, delegate: str, mailboxes: Sequence[str], *, revoke: bool = False) -> None:
    """``grant_full_access`` (or, with ``revoke``, its reverse) for many mailboxes by their primary addresses, in
    one change of the list: a benchmark's thousands of shared mailboxes without a second's wait for each."""
    lines = [line for mailbox in mailboxes for line in _access_lines(delegate, mailbox, [mailbox])]
    _change_grants(config, **({"remove": lines} if revoke else {"add": lines}))


def revoke_full_access(config: Path, delegate: str, mailbox: str, *aliases: str) -> None:
    """Take Full Access back (Remove-MailboxPermission). Succeeds when there was none."""
    _change_grants(config, remove=_access_lines(delegate, mailbox, [mailbox, *aliases]))


def _change_grants(config: Path, *, add: Sequence[str] = (), remove: Sequence[str] = ()) -> None:
    path = _grants_path(config)
    with _grants_lock(path):
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [line for line in lines if line not in remove]
        _write_grants(path, [*kept, *(line for line in add if line not in kept)])


@contextlib.contextmanager
def _grants_lock(path: Path) -> Iterator[None]:
    """Test processes running side by side change the one list: one at a time."""
    with path.with_suffix(".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_grants(path: Path, lines: list[str]) -> None:
    # Replaced whole (write, then rename): the auth process never reads half a list.
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text("".join(f"{line}\n" for line in lines))
    temporary.chmod(0o644)
    temporary.replace(path)
    # The passwd-file passdb looks at its file at most once per second (by clock second): a login in the second
    # of the change could still see the old list.
    time.sleep(1.05 - time.time() % 1)


def _mint_token(signing_key: Path, kid: str, issuer: str, user: str, ttl: int = 300) -> str:
    """An access token of the same shape the Entra stand-in issues, for warming up without a sign-in."""
    key = serialization.load_pem_private_key(Path(signing_key).read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError("the signing key must be an RSA private key")
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": IMAP_AUDIENCE,
        "sub": user,
        "preferred_username": user,
        "x_stand_in_mailbox": user,
        "scp": "IMAP.AccessAsUser.All",
        "iat": now,
        "exp": now + ttl,
    }

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = {"alg": "RS256", "typ": "JWT", "kid": kid}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def xoauth2(user: str, token: str) -> bytes:
    """The SASL XOAUTH2 initial response (unencoded; imaplib base64-encodes it)."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def sasl_answer(initial_response: bytes) -> Callable[[bytes], bytes]:
    """An imaplib authobject: the initial response, then an empty line if Dovecot answers with an error challenge
    (a refused token gets a JSON challenge that the client acknowledges before the final NO, RFC 7628)."""
    return lambda challenge: b"" if challenge else initial_response


def warm_up(
    port: int,
    *,
    ca_file: Path,
    signing_key: Path,
    signing_kid: str,
    issuer: str,
    host: str = "localhost",
    timeout: float = 30.0,
) -> float:
    """Log in once (as a throwaway user, with a locally signed token) so that later logins are fast.

    Returns the seconds the warm-up took. Raises DovecotError if no login succeeds within ``timeout``.
    """
    started = time.monotonic()
    context = ssl.create_default_context(cafile=str(ca_file))
    last_error: Exception | None = None
    while time.monotonic() - started < timeout:
        response = xoauth2(WARM_UP_USER, _mint_token(signing_key, signing_kid, issuer, WARM_UP_USER))
        try:
            with imaplib.IMAP4_SSL(host, port, ssl_context=context, timeout=timeout) as imap:
                imap.authenticate("XOAUTH2", sasl_answer(response))
                imap.select("INBOX")
                imap.logout()
            return time.monotonic() - started
        except (OSError, imaplib.IMAP4.error) as e:
            last_error = e
            time.sleep(0.2)
    raise DovecotError(f"no IMAP login on port {port} within {timeout:.0f} s: {last_error}")
