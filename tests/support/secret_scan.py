"""A pytest plugin that proves no secret reaches a log line or a page (DESIGN.md, guarantee 6).

When enabled (``SECRET_SCAN=1``, which scripts/test.sh sets, or any run that selects the ``faults`` marker) it:
- attaches a DEBUG handler to the root logger for the whole session, behind the app's redaction filter, as
  function_app.py installs it in production, so every library's DEBUG output is written where it can be read;
- records every response the tests receive from the app's routes (``/api/...``, ``/admin/...``) through
  ``requests``, plus whatever a test hands to ``record_page``, plus the log files of the local hosts
  (``record_file``), plus the stand-ins' logs under ``.stack/logs``;
- at the end gathers every secret value the session could have leaked: the stack's client secret, user password
  and host keys, every token in every version of every Key Vault secret (from the stand-in's state file),
  the SASL XOAUTH2 strings derived from the access tokens, and every authorization code the sign-in helper saw;
- fails the session, naming the kind of secret, a short prefix of it and where it was found.

``find_leaks`` is the scan itself: plain data in, findings out, so that a unit test can show it fails.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

ENV_SWITCH = "SECRET_SCAN"
KEEP_SWITCH = "SECRET_SCAN_KEEP"  # =1 keeps the captured text of a clean run too, to see what was scanned
MIN_SECRET_CHARS = 8  # shorter values (a port, "true") would match by chance
WINDOW = 24  # characters looked up at once; long enough to be unique inside a token
STRIDE = 8  # the text is sampled every STRIDE characters; a secret of WINDOW + STRIDE chars cannot slip through
PREFIX_SHOWN = 6  # characters of a leaked secret printed in the report: enough to find it, not to use it
CACHE_SECTIONS = ("AccessToken", "RefreshToken", "IdToken")
# Just below DEBUG: lets every DEBUG record through, and tells the scan's setting apart from a test's own choice.
SCAN_ROOT_LEVEL = logging.DEBUG - 1
_MARKEXPR_FAULTS = re.compile(r"(?<!not )\bfaults\b")


@dataclass(frozen=True)
class Leak:
    kind: str
    prefix: str
    source: str
    line: int

    def __str__(self) -> str:
        return f"{self.kind} {self.prefix}... in {self.source} (line {self.line})"


def _variants(value: str) -> set[str]:
    """The forms a value takes when it is written into a URL or JSON text."""
    return {value, quote(value, safe=""), value.replace("/", "\\/")}


def find_leaks(sources: Iterable[tuple[str, str]], secrets: Mapping[str, str]) -> list[Leak]:
    """Every place where one of ``secrets`` (value -> kind) appears whole in one of ``sources`` (name, text).

    Long values are found through a sampled index over their middle (JWTs share their first characters, their
    middles are unique), short ones by plain search. Values under MIN_SECRET_CHARS are ignored.
    """
    index: dict[str, list[tuple[str, str, int]]] = {}  # window -> (variant, kind, where the window starts in it)
    short: list[tuple[str, str]] = []
    for value, kind in secrets.items():
        if len(value) < MIN_SECRET_CHARS:
            continue
        for variant in _variants(value):
            if len(variant) < WINDOW + STRIDE:
                short.append((variant, kind))
                continue
            anchor = (len(variant) - WINDOW - STRIDE) // 2
            for offset in range(anchor, anchor + STRIDE):
                index.setdefault(variant[offset : offset + WINDOW], []).append((variant, kind, offset))
    leaks: dict[tuple[str, str, str], Leak] = {}

    def found(variant: str, kind: str, source: str, text: str, start: int) -> None:
        key = (variant, source, kind)
        if key not in leaks:
            leaks[key] = Leak(kind, variant[:PREFIX_SHOWN], source, text.count("\n", 0, start) + 1)

    for source, text in sources:
        for position in range(0, len(text) - WINDOW + 1, STRIDE):
            for variant, kind, offset in index.get(text[position : position + WINDOW], ()):
                start = position - offset
                if start >= 0 and text.startswith(variant, start):
                    found(variant, kind, source, text, start)
        for variant, kind in short:
            start = text.find(variant)
            if start >= 0:
                found(variant, kind, source, text, start)
    return sorted(leaks.values(), key=lambda leak: (leak.source, leak.line, leak.kind))


def xoauth2_base64(user: str, token: str) -> str:
    """The base64 SASL XOAUTH2 initial response a client sends for ``user`` with ``token``."""
    from devstack.dovecot import xoauth2

    return base64.b64encode(xoauth2(user, token)).decode()


def secrets_in_token_cache(serialized: str, users: Iterable[str]) -> dict[str, str]:
    """Tokens in an MSAL serialized cache (value -> kind), with the SASL strings of its access tokens for
    ``users`` (the mailbox and the account that signed in). A value that is not a cache gives nothing."""
    try:
        cache = json.loads(serialized)
    except ValueError:
        return {}
    if not isinstance(cache, dict):
        return {}
    found: dict[str, str] = {}
    for section in CACHE_SECTIONS:
        entries = cache.get(section)
        if not isinstance(entries, dict):
            continue
        for entry in entries.values():
            token = entry.get("secret") if isinstance(entry, dict) else None
            if not isinstance(token, str) or not token:
                continue
            found[token] = {"AccessToken": "access token", "RefreshToken": "refresh token"}.get(section, "id token")
            if section == "AccessToken":
                for user in {u for u in users if u}:
                    found[xoauth2_base64(user, token)] = "SASL XOAUTH2 string"
    return found


def secrets_in_keyvault_state(path: Path) -> dict[str, str]:
    """Every token in every version of every secret (deleted ones too) of the Key Vault stand-in's state file,
    and every other secret value as a 'Key Vault secret'."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    found: dict[str, str] = {}
    for group in ("secrets", "deleted"):
        for secret in (state.get(group) or {}).values():
            for version in secret.get("versions", []) if isinstance(secret, dict) else []:
                value = version.get("value")
                if not isinstance(value, str):
                    continue
                tags = version.get("tags") or {}
                tokens = secrets_in_token_cache(value, [tags.get("mailbox", ""), tags.get("signed-in-as", "")])
                found.update(tokens or {value: "Key Vault secret"})
    return found


def secrets_of_stack(stack_json: Path) -> dict[str, str]:
    try:
        info = json.loads(stack_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    kinds = {
        "client_secret": "client secret",
        "user_password": "user password",
        "function_key": "function key",
        "master_key": "master key",
        "glpi_app_token": "GLPI App-Token",
        "glpi_user_token": "GLPI user token",
    }
    return {str(info[name]): kind for name, kind in kinds.items() if info.get(name)}


# --- the plugin ------------------------------------------------------------------------------------------------


class SecretScan:
    """Collects what the session writes and reads, and scans it at the end. One per session."""

    def __init__(self, work_dir: Path, *, stack_dir: Path | None = None) -> None:
        from devstack.stack import run_dir

        self.work_dir = work_dir
        self.stack_dir = stack_dir or run_dir()
        self.log_path = work_dir / "session-debug.log"
        self.pages_dir = work_dir / "pages"
        self.pages_dir.mkdir(parents=True, exist_ok=True)
        self.leaks: list[Leak] = []
        self.scanned: list[str] = []
        self.secret_count = 0
        self._handler: logging.Handler | None = None
        self._previous_level = logging.NOTSET
        self._lock = threading.Lock()
        self._counter = 0
        self._unpatch: list[Any] = []

    # sources

    def record_page(self, source: str, text: str) -> None:
        """Keep a page (or any text a test received) for the final scan."""
        with self._lock:
            self._counter += 1
            name = f"{self._counter:05d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', source)[:80]}.txt"
        (self.pages_dir / name).write_text(f"{source}\n{text}", encoding="utf-8", errors="replace")

    def record_file(self, path: Path, source: str) -> None:
        """Keep a copy of a log file that will not outlive its test (a local host's log)."""
        if path.exists():
            self.record_page(source, path.read_text(encoding="utf-8", errors="replace"))

    def _sources(self) -> Iterator[tuple[str, str]]:
        if self.log_path.exists():
            yield "pytest process log (DEBUG)", self.log_path.read_text(encoding="utf-8", errors="replace")
        for page in sorted(self.pages_dir.iterdir()):
            source, _, text = page.read_text(encoding="utf-8", errors="replace").partition("\n")
            yield source, text
        for log in sorted((self.stack_dir / "logs").glob("*.log")):
            yield f"stand-in log {log.name}", log.read_text(encoding="utf-8", errors="replace")

    def secrets(self) -> dict[str, str]:
        from tests.support.signin import ISSUED_CODES

        found = secrets_of_stack(self.stack_dir / "stack.json")
        found.update(secrets_in_keyvault_state(self.stack_dir / "keyvault.json"))
        found.update({code: "authorization code" for code in ISSUED_CODES})
        return found

    # hooks

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        from shared.redaction import RedactingFilter

        handler = logging.FileHandler(self.log_path, encoding="utf-8")
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(threadName)s %(message)s"))
        handler.addFilter(RedactingFilter())
        root = logging.getLogger()
        self._previous_level = root.level
        root.addHandler(handler)
        root.setLevel(SCAN_ROOT_LEVEL)
        self._handler = handler
        # pytest's own capture handlers keep seeing what they saw before: tests read caplog as without the scan, and
        # reports do not hold megabytes of protocol lines (and mail) per test.
        logging_plugin = session.config.pluginmanager.get_plugin("logging-plugin")
        for name in ("caplog_handler", "report_handler"):
            capture = getattr(logging_plugin, name, None)
            if isinstance(capture, logging.Handler):
                capture.addFilter(_AsWithoutTheScan(self._previous_level))
        self._patch_requests()
        # Local hosts started by the tests log at DEBUG as well (tests/support/app_host.py reads this).
        os.environ["TEST_HOST_LOG_LEVEL"] = "DEBUG"

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        for undo in self._unpatch:
            undo()
        if self._handler is not None:
            root = logging.getLogger()
            root.removeHandler(self._handler)
            root.setLevel(self._previous_level)
            self._handler.close()
        secrets = self.secrets()
        self.secret_count = len(secrets)
        sources = list(self._sources())
        self.scanned = [name for name, _ in sources]
        self.leaks = find_leaks(sources, secrets)
        if self.leaks:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        elif os.environ.get(KEEP_SWITCH) != "1":
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.section("secret scan")
        if self.leaks:
            terminalreporter.write_line(
                f"FAILED: {len(self.leaks)} secret(s) leaked; the captured text is kept in {self.work_dir}", red=True
            )
            for leak in self.leaks:
                terminalreporter.write_line(f"  {leak}", red=True)
        else:
            kept = f"; kept in {self.work_dir}" if self.work_dir.exists() else ""
            terminalreporter.write_line(
                f"clean: {self.secret_count} secret values searched in {len(self.scanned)} sources "
                f"(DEBUG log, app pages, host logs, stand-in logs){kept}"
            )

    def _patch_requests(self) -> None:
        from requests.adapters import HTTPAdapter

        original = HTTPAdapter.send
        scan = self

        def send(adapter: HTTPAdapter, request: Any, *args: Any, **kwargs: Any) -> Any:
            response = original(adapter, request, *args, **kwargs)
            if not kwargs.get("stream") and _is_app_route(request.url):
                headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items() if k.lower() != "location")
                scan.record_page(f"page {request.method} {urlsplit(request.url).path}", f"{headers}\n\n{response.text}")
            return response

        HTTPAdapter.send = send  # type: ignore[method-assign]
        self._unpatch.append(lambda: setattr(HTTPAdapter, "send", original))


def _is_app_route(url: str) -> bool:
    # The app's own pages. The Location of its redirect to Entra carries the flow's state by design, and the
    # stand-ins' pages (Entra's form post carries the code to the app) are not the app's output.
    parts = urlsplit(url)
    return parts.hostname in ("localhost", "127.0.0.1") and parts.path.startswith(("/api/", "/admin/"))


class _AsWithoutTheScan(logging.Filter):
    """Drops the records that reach a handler only because the scan lowered the root logger's level.

    A record passed its own logger; if no logger between it and the root has a level of its own, it passed the
    root's level, which is the scan's unless a test (caplog.set_level) chose another. Then the level the root had
    before the scan decides, as it would have without the scan.
    """

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        root = logging.getLogger()
        if root.level != SCAN_ROOT_LEVEL or record.levelno >= self.level:
            return True
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not root:
            if logger.level != logging.NOTSET:
                return True
            logger = logger.parent if logger.propagate else None
        return False


_SESSION: dict[str, SecretScan] = {}  # the session's scan, when this run scans


def enabled(config: pytest.Config) -> bool:
    return os.environ.get(ENV_SWITCH) == "1" or bool(_MARKEXPR_FAULTS.search(config.option.markexpr or ""))


def configure(config: pytest.Config) -> None:
    """Register the plugin when the run asks for it (call from conftest's pytest_configure)."""
    if not enabled(config) or config.pluginmanager.has_plugin("secret-scan"):
        return
    scan = SecretScan(Path(tempfile.mkdtemp(prefix="secret-scan-")))
    _SESSION["scan"] = scan
    config.pluginmanager.register(scan, "secret-scan")


def active() -> SecretScan | None:
    """The session's scan, or None when this run does not scan."""
    return _SESSION.get("scan")


def record_page(source: str, text: str) -> None:
    scan = active()
    if scan is not None:
        scan.record_page(source, text)


def record_file(path: Path, source: str) -> None:
    scan = active()
    if scan is not None:
        scan.record_file(path, source)
