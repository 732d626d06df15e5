"""Function and master keys, and local.settings.json loading, in the local Functions host."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from devstack.host import (
    FUNCTION_KEY_SETTING,
    MASTER_KEY_SETTING,
    HostError,
    HostKeys,
    apply_settings,
    load_host_keys,
    read_local_settings,
)

KEYS = HostKeys(function_key="function-key-value-0123456789", master_key="master-key-value-0123456789")


def test_anonymous_needs_no_key() -> None:
    assert KEYS.allows(None, "anonymous")
    assert KEYS.allows("anything", "ANONYMOUS")


def test_function_level_takes_the_function_or_the_master_key() -> None:
    assert KEYS.allows(KEYS.function_key, "function")
    assert KEYS.allows(KEYS.master_key, "FUNCTION")
    for wrong in (None, "", "nope", KEYS.function_key[:-1], KEYS.function_key + "x", KEYS.function_key.upper()):
        assert not KEYS.allows(wrong, "function")


def test_admin_level_takes_the_master_key_only() -> None:
    assert KEYS.allows(KEYS.master_key, "admin")
    assert not KEYS.allows(KEYS.function_key, "admin")
    assert not KEYS.allows(None, "admin")


def test_non_ascii_keys_are_refused_not_crashing() -> None:
    assert not KEYS.allows("clé", "function")


def test_keys_never_show_in_repr() -> None:
    assert KEYS.function_key not in repr(KEYS)
    assert KEYS.master_key not in repr(KEYS)


def test_keys_from_settings_write_no_file(tmp_path: Path) -> None:
    environ = {FUNCTION_KEY_SETTING: "f-from-settings", MASTER_KEY_SETTING: "m-from-settings"}
    keys, path = load_host_keys(environ, tmp_path / ".host-keys.json")
    assert keys == HostKeys("f-from-settings", "m-from-settings")
    assert path is None
    assert not (tmp_path / ".host-keys.json").exists()


def test_generated_keys_go_to_a_private_file_and_stay_across_restarts(tmp_path: Path) -> None:
    keys_path = tmp_path / ".host-keys.json"
    keys, path = load_host_keys({}, keys_path)
    assert path == keys_path
    assert stat.S_IMODE(keys_path.stat().st_mode) == 0o600
    stored = json.loads(keys_path.read_text())
    assert stored == {"functionKey": keys.function_key, "masterKey": keys.master_key}
    assert len(keys.function_key) >= 40 and keys.function_key != keys.master_key
    again, _ = load_host_keys({}, keys_path)
    assert again == keys
    assert load_host_keys({}, tmp_path / "other.json")[0] != keys


def test_a_loosened_keys_file_is_made_private_again(tmp_path: Path) -> None:
    keys_path = tmp_path / ".host-keys.json"
    load_host_keys({}, keys_path)
    keys_path.chmod(0o644)
    load_host_keys({}, keys_path)
    assert stat.S_IMODE(keys_path.stat().st_mode) == 0o600


def test_only_the_missing_key_is_generated_and_stored(tmp_path: Path) -> None:
    keys_path = tmp_path / ".host-keys.json"
    keys, _ = load_host_keys({MASTER_KEY_SETTING: "m-from-settings"}, keys_path)
    assert keys.master_key == "m-from-settings"
    stored = json.loads(keys_path.read_text())
    assert stored == {"functionKey": keys.function_key}  # a key from the settings is not copied anywhere


def test_settings_values_do_not_override_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(
        json.dumps({"IsEncrypted": False, "Values": {"A": "from-file", "B": "from-file", "N": 5, "T": True}})
    )
    environ = {"A": "from-environment"}
    applied = apply_settings(read_local_settings(path), environ)
    assert environ == {"A": "from-environment", "B": "from-file", "N": "5", "T": "true"}
    assert sorted(applied) == ["B", "N", "T"]


def test_a_missing_settings_file_is_empty(tmp_path: Path) -> None:
    assert read_local_settings(tmp_path / "absent.json") == {}


def test_a_broken_settings_file_is_named_without_its_content(tmp_path: Path) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text('{"Values": {"ENTRA_CLIENT_SECRET": "s3cr3t-value" oops}}')
    with pytest.raises(HostError) as raised:
        read_local_settings(path)
    assert "local.settings.json" in str(raised.value)
    assert "s3cr3t" not in str(raised.value)


@pytest.mark.parametrize(
    "document",
    [{"IsEncrypted": True, "Values": {}}, {"Values": {"A": {"nested": 1}}}, {"Values": ["A"]}, ["Values"]],
)
def test_unusable_settings_files_are_refused(tmp_path: Path, document: object) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps(document))
    with pytest.raises(HostError):
        read_local_settings(path)
