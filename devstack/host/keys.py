"""Function and master keys: where they come from (settings, else a private file that survives restarts) and
which key opens which auth level."""

from __future__ import annotations

import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

KEYS_FILE_NAME = ".host-keys.json"
FUNCTION_KEY_SETTING = "LOCAL_FUNCTION_KEY"
MASTER_KEY_SETTING = "LOCAL_MASTER_KEY"
KEY_HEADER = "x-functions-key"
KEY_QUERY_PARAMETER = "code"
GENERATED_KEY_BYTES = 32

AUTH_ANONYMOUS = "anonymous"
AUTH_FUNCTION = "function"
AUTH_ADMIN = "admin"


@dataclass(frozen=True)
class HostKeys:
    """The function key and the master key this host accepts. ``repr`` never shows them."""

    function_key: str = field(repr=False)
    master_key: str = field(repr=False)

    def allows(self, presented: str | None, auth_level: str) -> bool:
        """Whether a presented key opens a function of ``auth_level`` (anonymous, function or admin).

        Every accepted key is compared with ``hmac.compare_digest``, so timing does not tell how much of a key
        was right, nor which key matched.
        """
        level = auth_level.lower()
        if level == AUTH_ANONYMOUS:
            return True
        if not presented:
            return False
        accepted = [self.master_key] if level == AUTH_ADMIN else [self.function_key, self.master_key]
        candidate = presented.encode("utf-8")
        allowed = False
        for key in accepted:
            allowed |= hmac.compare_digest(candidate, key.encode("utf-8"))
        return allowed


def _read_keys_file(path: Path) -> dict[str, str]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {name: value for name, value in document.items() if isinstance(value, str) and value}


def _write_private_file(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def load_host_keys(environ: Mapping[str, str], keys_path: Path) -> tuple[HostKeys, Path | None]:
    """Return the keys from the settings LOCAL_FUNCTION_KEY / LOCAL_MASTER_KEY.

    A key that is not set is taken from ``keys_path`` when an earlier start wrote it there, else generated and
    written there (mode 0600), so that scripts can read it and it stays the same across restarts. Returns the keys
    and the file holding any of them (None when both come from the settings).
    """
    from_settings = {
        "functionKey": environ.get(FUNCTION_KEY_SETTING) or "",
        "masterKey": environ.get(MASTER_KEY_SETTING) or "",
    }
    if all(from_settings.values()):
        return HostKeys(from_settings["functionKey"], from_settings["masterKey"]), None
    stored = _read_keys_file(keys_path)
    kept: dict[str, str] = {}
    for name, value in from_settings.items():
        if not value:
            kept[name] = stored.get(name) or secrets.token_urlsafe(GENERATED_KEY_BYTES)
    if kept != stored:
        _write_private_file(keys_path, json.dumps(kept, indent=2) + "\n")
    elif keys_path.stat().st_mode & 0o077:
        keys_path.chmod(0o600)
    merged = {**from_settings, **kept}
    return HostKeys(merged["functionKey"], merged["masterKey"]), keys_path
