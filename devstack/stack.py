"""Start, stop and describe the local stand-ins for Azure: Azurite, the Key Vault endpoint, the Entra ID
stand-in, Dovecot and the GLPI stand-in. Everything listens on loopback; state, certificates and logs live in
``.stack/``.

``start`` is idempotent: parts already running (pid alive and port answering) are left alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack import certs

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 40.0  # seconds; Dovecot's first start and Node's module loading are the slow ones


def run_dir() -> Path:
    return Path(os.environ.get("STACK_DIR", REPO / ".stack"))


def dovecot_dir(folder: Path) -> Path:
    """Where Dovecot's files and mail live: in the run folder when its unprivileged mail user can reach it, else
    under /var/tmp (a clone inside a private home folder, as CI may use)."""
    if all(p.stat().st_mode & stat.S_IXOTH for p in [folder.resolve(), *folder.resolve().parents] if p.exists()):
        return folder
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    fallback = Path("/var/tmp") / f"mail-collector-{digest}"  # noqa: S108 - test mail only, named per clone
    fallback.mkdir(mode=0o755, exist_ok=True)
    return fallback


def _port(name: str, default: int) -> int:
    return int(os.environ.get(f"STACK_{name}_PORT", default))


@dataclass(frozen=True)
class Ports:
    """Loopback ports of the parts; each settable with STACK_<NAME>_PORT (read when the object is made)."""

    blob: int = field(default_factory=lambda: _port("BLOB", 10000))
    queue: int = field(default_factory=lambda: _port("QUEUE", 10001))
    table: int = field(default_factory=lambda: _port("TABLE", 10002))
    keyvault: int = field(default_factory=lambda: _port("KEYVAULT", 10444))
    entra: int = field(default_factory=lambda: _port("ENTRA", 10443))
    imaps: int = field(default_factory=lambda: _port("IMAPS", 10993))
    host: int = field(default_factory=lambda: _port("HOST", 7071))
    glpi: int = field(default_factory=lambda: _port("GLPI", 10680))


class StackError(RuntimeError):
    """A part of the local stack failed to start or is not running; the message names it."""


@dataclass(frozen=True)
class Part:
    name: str
    port: int
    command: Callable[[], list[str]]
    ready: Callable[[], bool]
    env: dict[str, str] | None = None


def _identity(folder: Path) -> dict[str, str]:
    """Tenant, client and the test user's password: made once, then kept so that stored settings stay valid."""
    path = folder / "identity.json"
    data: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    made: dict[str, Callable[[], str]] = {
        "tenant_id": lambda: str(uuid.uuid4()),
        "client_id": lambda: str(uuid.uuid4()),
        "client_secret": lambda: secrets.token_urlsafe(32),
        "user_password": lambda: secrets.token_urlsafe(12),
        "function_key": lambda: secrets.token_urlsafe(24),
        "master_key": lambda: secrets.token_urlsafe(24),
        # The function app's user-assigned managed identity, and the platform's secret for its token endpoint.
        "managed_identity_client_id": lambda: str(uuid.uuid4()),
        "managed_identity_principal_id": lambda: str(uuid.uuid4()),
        "identity_header": lambda: secrets.token_urlsafe(24),
        # The GLPI stand-in's API client App-Token and API user token (GLPI's are 40 characters of [a-z0-9]).
        "glpi_app_token": lambda: secrets.token_hex(20),
        "glpi_user_token": lambda: secrets.token_hex(20),
        # Tenants of a multitenant app's customers: one where an admin consented IMAP.AccessAsApp, one where the
        # app was consented without that application permission (its app tokens carry no roles claim).
        "other_tenant_id": lambda: str(uuid.uuid4()),
        "unconsented_tenant_id": lambda: str(uuid.uuid4()),
    }
    missing = {name: make() for name, make in made.items() if name not in data}
    if missing:  # a run folder from before a field existed keeps its other values
        data.update(missing)
        path.write_text(json.dumps(data, indent=2))
        path.chmod(0o600)
    return data


# Azurite's published development account and key: well-known constants, not secrets.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_connection_string(blob: int, queue: int, table: int) -> str:
    """The connection string of an Azurite listening on these loopback ports."""
    endpoints = "".join(
        f"{kind}Endpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
        for kind, port in (("Blob", blob), ("Queue", queue), ("Table", table))
    )
    return f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};{endpoints}"


def describe() -> dict[str, Any]:
    """Everything a client needs to use the stack (written to ``.stack/stack.json`` too)."""
    folder = run_dir()
    ports = Ports()
    paths = certs.ensure_certificates(folder / "tls")
    signing_key, signing_public, kid = certs.ensure_signing_key(folder / "tls")
    app_key, app_cert, app_thumbprint = certs.ensure_client_certificate(folder / "tls")
    ident = _identity(folder)
    entra_origin = f"https://localhost:{ports.entra}"
    storage = azurite_connection_string(ports.blob, ports.queue, ports.table)
    return {
        "run_dir": str(folder),
        "ports": ports.__dict__,
        "ca": str(paths["ca"]),
        "ca_bundle": str(paths["bundle"]),
        "tls_cert": str(paths["cert"]),
        "tls_key": str(paths["key"]),
        "signing_key": str(signing_key),
        "signing_public_key": str(signing_public),
        "signing_kid": kid,
        # The app registration's certificate credential (the alternative to its secret and federated credential).
        "app_certificate": str(app_cert),
        "app_certificate_key": str(app_key),
        "app_certificate_thumbprint": app_thumbprint,
        "entra_origin": entra_origin,
        "issuer": f"{entra_origin}/{ident['tenant_id']}/v2.0",
        # App Service's managed-identity endpoint (IDENTITY_ENDPOINT), served by the Entra stand-in.
        "identity_endpoint": f"{entra_origin}/msi/token",
        "key_vault_uri": f"https://localhost:{ports.keyvault}",
        "imap_host": "localhost",
        "imap_port": ports.imaps,
        "storage_connection_string": storage,
        "host_origin": f"http://localhost:{ports.host}",
        "glpi_url": f"https://localhost:{ports.glpi}/apirest.php",
        "dovecot_config": str(dovecot_dir(folder) / "dovecot" / "dovecot.conf"),
        **ident,
    }


def app_object_id(info: dict[str, Any], tenant_id: str | None = None) -> str:
    """The object id of the app's enterprise application (service principal) in ``tenant_id`` (default: the home
    tenant): the ``oid`` of the Entra stand-in's app-only tokens (see server.mjs oidFor)."""
    tenant = tenant_id or info["tenant_id"]
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailto:{info['client_id']}@apps.{tenant}".lower()))


def issuer_of(info: dict[str, Any], tenant_id: str) -> str:
    """The token issuer of a tenant of the Entra stand-in."""
    return f"{info['entra_origin']}/{tenant_id}/v2.0"


def app_settings(info: dict[str, Any]) -> dict[str, str]:
    """App settings for running the function app against this stack (the Values of local.settings.json)."""
    return {
        "FUNCTIONS_WORKER_RUNTIME": "python",
        "AzureWebJobsFeatureFlags": "EnableWorkerIndexing",
        "AzureWebJobsStorage": info["storage_connection_string"],
        "KEY_VAULT_URI": info["key_vault_uri"],
        # Locally the app authenticates to Key Vault as the Entra app itself (azure-identity's environment
        # credential); in Azure it is the managed identity and these three are absent.
        "AZURE_TENANT_ID": info["tenant_id"],
        "AZURE_CLIENT_ID": info["client_id"],
        "AZURE_CLIENT_SECRET": info["client_secret"],
        "AZURE_AUTHORITY_HOST": info["entra_origin"],
        "ENTRA_TENANT_ID": info["tenant_id"],
        "ENTRA_CLIENT_ID": info["client_id"],
        "ENTRA_CLIENT_SECRET": info["client_secret"],
        "ENTRA_AUTHORITY_HOST": info["entra_origin"],
        "IMAP_HOST": info["imap_host"],
        "IMAP_PORT": str(info["imap_port"]),
        "TLS_CA_BUNDLE": info["ca_bundle"],
        "COLLECT_SCHEDULE": "0 */5 * * * *",
        # Trigger bindings name these with %...%, so the host needs them even where the code has defaults.
        "WORK_QUEUE_NAME": "collect-work",
        "MAIL_QUEUE_NAME": "incoming-mail",
        "LOCAL_FUNCTION_KEY": info["function_key"],
        "LOCAL_MASTER_KEY": info["master_key"],
        "GLPI_URL": info["glpi_url"],
        "GLPI_APP_TOKEN": info["glpi_app_token"],
        "GLPI_USER_TOKEN": info["glpi_user_token"],
        # Off unless a test or the demo turns it on: it would otherwise take the envelopes other tests read.
        "AzureWebJobs.glpi_tickets.Disabled": "true",
    }


def isolated_settings(info: dict[str, Any], tag: str, **overrides: str) -> dict[str, str]:
    """App settings whose queues, containers and tables carry ``tag``: a test or benchmark sees only its own data."""
    values = app_settings(info)
    values.update(
        MAIL_QUEUE_NAME=f"{tag}-mail",
        WORK_QUEUE_NAME=f"{tag}-work",
        MAIL_CONTAINER_NAME=f"{tag}-raw",
        LEASE_CONTAINER_NAME=f"{tag}-lease",
        MAILBOX_TABLE_NAME=f"{tag}mailboxes",
        CONSENT_TABLE_NAME=f"{tag}flows",
        GLPI_STATE_TABLE_NAME=f"{tag}glpi",
    )
    values.update(overrides)
    return values


def write_local_settings(info: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps({"IsEncrypted": False, "Values": app_settings(info)}, indent=2) + "\n")
    path.chmod(0o600)


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _https_ok(url: str, ca: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            context = ssl.create_default_context(cafile=ca)
            with urllib.request.urlopen(url, timeout=2, context=context) as response:  # noqa: S310 - https only
                return bool(response.status == 200)
        except OSError:
            return False

    return check


def _parts(info: dict[str, Any]) -> list[Part]:
    folder = Path(info["run_dir"])
    ports = Ports()
    from devstack import dovecot  # imported here: it is only needed when Dovecot is started

    def azurite() -> list[str]:
        # With lookups by the most selective index first (devstack/azurite_lookups.cjs, docs/fidelity.md).
        return [
            "node", "--require", str(REPO / "devstack" / "azurite_lookups.cjs"),
            str(REPO / "devstack" / "node_modules" / "azurite" / "dist" / "src" / "azurite.js"),
            "--silent",
            "--location", str(folder / "azurite"),
            "--blobHost", "127.0.0.1", "--blobPort", str(ports.blob),
            "--queueHost", "127.0.0.1", "--queuePort", str(ports.queue),
            "--tableHost", "127.0.0.1", "--tablePort", str(ports.table),
            "--skipApiVersionCheck", "--disableTelemetry", "--loose",
        ]  # fmt: skip

    def keyvault() -> list[str]:
        return [
            sys.executable, "-m", "devstack.keyvault",
            "--host", "127.0.0.1", "--port", str(ports.keyvault),
            "--cert", info["tls_cert"], "--key", info["tls_key"],
            "--state", str(folder / "keyvault.json"),
            "--tenant", info["tenant_id"], "--authority-host", info["entra_origin"],
            # As deployed (infra/main.bicep): 7 days of soft-delete retention, Azure RBAC with the Secrets Officer
            # role for the app (locally its app registration, in federated mode its managed identity).
            "--retention-days", "7",
            "--rbac", app_object_id(info), "--rbac", info["managed_identity_principal_id"],
        ]  # fmt: skip

    def entra() -> list[str]:
        config = folder / "entra.json"
        config.write_text(
            json.dumps(
                {
                    "host": "127.0.0.1",
                    "port": ports.entra,
                    "public_origin": info["entra_origin"],
                    "tls_cert": info["tls_cert"],
                    "tls_key": info["tls_key"],
                    "signing_key": info["signing_key"],
                    "signing_kid": info["signing_kid"],
                    "tenant_id": info["tenant_id"],
                    "user_password": info["user_password"],
                    "identity_header": info["identity_header"],
                    "managed_identities": [
                        {
                            "client_id": info["managed_identity_client_id"],
                            "principal_id": info["managed_identity_principal_id"],
                        }
                    ],
                    "clients": [
                        {
                            "client_id": info["client_id"],
                            "client_secret": info["client_secret"],
                            "redirect_uris": [f"http://localhost:{ports.host}/api/auth/callback"],
                            # Admin consent for the application permission in the home tenant (azd up's
                            # ENTRA_APP_ONLY), and the certificate credential's public half.
                            "app_roles": ["IMAP.AccessAsApp"],
                            "certificates": [Path(info["app_certificate"]).read_text()],
                            # The app registration trusts the function app's managed identity (federated mode).
                            "federated_credentials": [
                                {
                                    "issuer": info["issuer"],
                                    "subject": info["managed_identity_principal_id"],
                                    "audiences": ["api://AzureADTokenExchange"],
                                }
                            ],
                        }
                    ],
                    "other_tenants": [
                        {
                            "tenant_id": info["other_tenant_id"],
                            "consented_apps": {info["client_id"]: ["IMAP.AccessAsApp"]},
                        },
                        {"tenant_id": info["unconsented_tenant_id"], "consented_apps": {info["client_id"]: []}},
                    ],
                },
                indent=2,
            )
        )
        config.chmod(0o600)
        return ["node", str(REPO / "devstack" / "entra" / "server.mjs"), "--config", str(config)]

    def glpi() -> list[str]:
        # The tokens go in a file: a command line is readable by every local user.
        tokens = folder / "glpi-tokens.json"
        tokens.write_text(json.dumps({"app_token": info["glpi_app_token"], "user_token": info["glpi_user_token"]}))
        tokens.chmod(0o600)
        return [
            sys.executable, "-m", "devstack.glpi", "--port", str(ports.glpi),
            "--cert", info["tls_cert"], "--key", info["tls_key"], "--tokens", str(tokens),
        ]  # fmt: skip

    def dovecot_command() -> list[str]:
        conf = dovecot.write_config(
            dovecot_dir(folder),
            port=ports.imaps,
            tls_cert=Path(info["tls_cert"]),
            tls_key=Path(info["tls_key"]),
            signing_public_key=Path(info["signing_public_key"]),
            signing_kid=info["signing_kid"],
            issuer=info["issuer"],
            other_issuers=[
                issuer_of(info, info["other_tenant_id"]),
                issuer_of(info, info["unconsented_tenant_id"]),
            ],
        )
        return ["dovecot", "-F", "-c", str(conf)]

    return [
        Part("azurite", ports.queue, azurite, lambda: all(map(_tcp_open, (ports.blob, ports.queue, ports.table)))),
        Part("keyvault", ports.keyvault, keyvault,
             _https_ok(f"https://localhost:{ports.keyvault}/_control/health", info["ca"]),
             env={"PYTHONPATH": str(REPO)}),
        Part("entra", ports.entra, entra, _https_ok(f"{info['entra_origin']}/_control/health", info["ca"])),
        Part("dovecot", ports.imaps, dovecot_command, lambda: _tcp_open(ports.imaps)),
        Part("glpi", ports.glpi, glpi, _https_ok(f"https://localhost:{ports.glpi}/_control/health", info["ca"]),
             env={"PYTHONPATH": str(REPO)}),
    ]  # fmt: skip


def _pid_file(name: str) -> Path:
    return run_dir() / "pids" / f"{name}.pid"


def _running_pid(name: str) -> int | None:
    try:
        pid = int(_pid_file(name).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _log_tail(name: str, lines: int = 15) -> str:
    path = run_dir() / "logs" / f"{name}.log"
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start(*, parts: tuple[str, ...] = ()) -> dict[str, Any]:
    """Start every part (or the named ones) that is not running, wait until each answers, and return describe().

    Raises StackError naming the part that did not come up, with the end of its log.
    """
    folder = run_dir()
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    (folder / "pids").mkdir(parents=True, exist_ok=True)
    info = describe()
    (folder / "stack.json").write_text(json.dumps(info, indent=2))
    (folder / "stack.json").chmod(0o600)
    for part in _parts(info):
        if parts and part.name not in parts:
            continue
        if _running_pid(part.name) and part.ready():
            continue
        if part.ready():
            raise StackError(f"{part.name}: port {part.port} is taken by another process; stop it or set STACK_*_PORT")
        log = (folder / "logs" / f"{part.name}.log").open("ab")
        try:
            process = subprocess.Popen(
                part.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env={**os.environ, **(part.env or {})},
                start_new_session=True,
            )
        except FileNotFoundError as e:
            raise StackError(f"{part.name}: cannot run {e.filename}; run scripts/setup.sh first") from e
        _pid_file(part.name).write_text(str(process.pid))
        deadline = time.monotonic() + START_TIMEOUT
        while not part.ready():
            if process.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {process.returncode}" if process.poll() is not None else "did not answer"
                raise StackError(
                    f"{part.name} {state} on port {part.port}; its log ({folder / 'logs'}) ends with:\n"
                    + _log_tail(part.name)
                )
            time.sleep(0.2)
    return info


def stop() -> None:
    """Stop every part this stack started (by process group); parts not running are skipped."""
    for name in ("glpi", "dovecot", "entra", "keyvault", "azurite"):
        pid = _running_pid(name)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            if _running_pid(name) is None:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
        _pid_file(name).unlink(missing_ok=True)


def status() -> dict[str, bool]:
    info = describe()
    return {part.name: bool(_running_pid(part.name)) and part.ready() for part in _parts(info)}


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    command = args[0] if args else "status"
    try:
        if command == "start":
            info = start()
            write_local_settings(info, REPO / "local.settings.json")
            print(f"local stack is up; settings in {REPO / 'local.settings.json'}, logs in {run_dir() / 'logs'}")
        elif command == "stop":
            stop()
            print("local stack stopped")
        elif command == "status":
            states = status()
            for name, up in states.items():
                print(f"{name:9} {'up' if up else 'DOWN'}")
            return 0 if all(states.values()) else 1
        else:
            print("usage: python -m devstack [start|stop|status]", file=sys.stderr)
            return 2
    except StackError as e:
        print(f"local stack: {e}", file=sys.stderr)
        return 1
    return 0
