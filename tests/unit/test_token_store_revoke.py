"""Revoke and re-consent against a vault that refuses purging (purge protection): the Key Vault stand-in purges, so
this path is shown with a scripted client that answers as Key Vault does (409 for a soft-deleted name, 403 purge)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError

from shared.token_store import TokenCacheStore


class _Done:
    def wait(self) -> None:
        return None


@dataclass
class PurgeProtectedVault:
    versions: list[dict[str, Any]] = field(default_factory=list)  # {"version", "value", "enabled"}
    deleted: bool = False

    def set_secret(self, name: str, value: str, **_: Any) -> Any:
        if self.deleted:
            raise ResourceExistsError("Secret is currently in a deleted but recoverable state")
        self.versions.append({"version": f"v{len(self.versions) + 1}", "value": value, "enabled": True})
        return SimpleNamespace(properties=SimpleNamespace(version=self.versions[-1]["version"]))

    def get_secret(self, name: str) -> Any:
        if self.deleted or not self.versions:
            raise ResourceNotFoundError("Secret not found")
        latest = self.versions[-1]
        return SimpleNamespace(value=latest["value"], properties=SimpleNamespace(version=latest["version"]))

    def begin_delete_secret(self, name: str) -> _Done:
        self.deleted = True
        return _Done()

    def purge_deleted_secret(self, name: str) -> None:
        response = SimpleNamespace(status_code=403, reason="Forbidden", headers={}, text=lambda: "")
        error = HttpResponseError("Operation 'purge' is not allowed because purge protection is enabled")
        error.status_code, error.response = 403, response  # type: ignore[assignment]
        raise error

    def begin_recover_deleted_secret(self, name: str) -> _Done:
        self.deleted = False
        return _Done()

    def list_properties_of_secret_versions(self, name: str) -> list[Any]:
        return [SimpleNamespace(version=v["version"], enabled=v["enabled"]) for v in self.versions]

    def update_secret_properties(self, name: str, version: str, *, enabled: bool) -> None:
        next(v for v in self.versions if v["version"] == version)["enabled"] = enabled


def test_without_purge_the_revoke_says_so_and_a_reconsent_disables_every_old_version() -> None:
    vault = PurgeProtectedVault()
    store = TokenCacheStore(vault)  # type: ignore[arg-type]
    store.save("a@example.test", "old-1")
    store.save("a@example.test", "old-2")

    removal = store.remove("a@example.test")
    assert (removal.existed, removal.purged) == (True, False)

    store.save("a@example.test", "new", new_consent=True)
    assert [(v["value"], v["enabled"]) for v in vault.versions] == [("old-1", False), ("old-2", False), ("new", True)]
