"""ConsentService against in-memory fakes: the secret before the row, a flow used once, the wrong account, an
unreachable identity provider or store, expiry, and a re-consent that keeps the checkpoint. The consent suites
(integration, browser, HTTP abuse) check the same through the real parts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from collectors.consent import ConsentProblem, ConsentService
from shared.errors import MailboxAccessError, TransientError
from shared.registry import Mailbox, MailboxMode, MailboxRegistry, MailboxStatus
from tests.support.fakes import FakeFlowTable, FakeIdentityProvider, FakeStore, FakeTable, settings

ADDRESS = "support@contoso.example"
REDIRECT = "https://app.example/api/auth/callback"


class Consent:
    def __init__(self) -> None:
        self.idp = FakeIdentityProvider()
        self.store = FakeStore()
        self.flows = FakeFlowTable()
        self.registry = MailboxRegistry(FakeTable())  # type: ignore[arg-type]
        self.service = ConsentService(
            settings(),
            flows=self.flows,  # type: ignore[arg-type]
            registry=self.registry,
            store=self.store,  # type: ignore[arg-type]
            app_factory=self.idp.app,
            prove=self.prove,
        )
        self.opens: dict[str, set[str]] = {}  # account -> the other mailboxes it has Full Access to
        self.proofs: list[tuple[str, str]] = []

    def prove(self, _settings: Any, address: str, token: str, folder: str, *, signed_in_as: str, refused: Any) -> int:
        """The IMAP side: the account opens its own mailbox and those it was given, nothing else."""
        self.proofs.append((address, folder))
        assert token == "at-0"
        if signed_in_as != address and address not in self.opens.get(signed_in_as, set()):
            raise refused()
        return 1

    def signed_in(self, address: str = ADDRESS, **options: str) -> dict[str, str]:
        return self.idp.sign_in(self.service.start(address, redirect_uri=REDIRECT, options=options))


@pytest.fixture
def consent() -> Consent:
    return Consent()


def test_the_secret_is_stored_before_the_row(consent: Consent) -> None:
    order: list[str] = []
    save, put = consent.store.save, consent.registry.put
    consent.store.save = lambda *a, **k: order.append("secret") or save(*a, **k)  # type: ignore[method-assign]
    consent.registry.put = lambda *a, **k: order.append("row") or put(*a, **k)  # type: ignore[method-assign]

    result = consent.service.complete(consent.signed_in(after_action="move", move_to="Done"))

    assert (result.address, result.signed_in_as, result.reconsent) == (ADDRESS, ADDRESS, False)
    assert order == ["secret", "row"]
    row = consent.registry.get(ADDRESS)
    assert row.status is MailboxStatus.ACTIVE and row.options.move_to == "Done"
    assert consent.store.refresh_token() == "rt-0"


def test_a_flow_is_used_once(consent: Consent) -> None:
    form = consent.signed_in()
    consent.service.complete(form)
    with pytest.raises(ConsentProblem, match="already used"):
        consent.service.complete(form)
    assert len(consent.store.versions) == 1


def test_the_wrong_account_stores_nothing(consent: Consent) -> None:
    consent.idp.signs_in_as = "someone.else@contoso.example"
    with pytest.raises(ConsentProblem, match="Wrong account") as problem:
        consent.service.complete(consent.signed_in())
    assert "someone.else@contoso.example" in problem.value.detail and "Full Access" in problem.value.next_step
    assert consent.store.versions == [] and consent.registry.find(ADDRESS) is None


def test_the_grant_is_proven_by_imap_not_by_the_sign_in_name(consent: Consent) -> None:
    # A UPN that is none of the mailbox's addresses, for an account the IMAP side lets in: stored.
    consent.idp.signs_in_as = "s.upport@contoso.onmicrosoft.com"
    consent.opens["s.upport@contoso.onmicrosoft.com"] = {ADDRESS}
    result = consent.service.complete(consent.signed_in(folder="Tickets"))
    assert result.signed_in_as == "s.upport@contoso.onmicrosoft.com"
    assert consent.proofs == [(ADDRESS, "Tickets")]


def test_a_folder_that_does_not_open_stores_nothing(consent: Consent) -> None:
    def missing(*_a: Any, **_k: Any) -> int:
        raise MailboxAccessError("cannot open folder 'Tickets'", remedy="create the folder or change the option")

    consent.service._prove = missing
    with pytest.raises(ConsentProblem, match="Folder cannot be opened") as problem:
        consent.service.complete(consent.signed_in(folder="Tickets"))
    assert problem.value.next_step.startswith("Create the folder")
    assert consent.store.versions == [] and consent.registry.find(ADDRESS) is None


def test_an_unreachable_identity_provider_stores_nothing(consent: Consent) -> None:
    form = consent.signed_in()
    consent.idp.unreachable = True
    with pytest.raises(TransientError, match="unreachable"):
        consent.service.complete(form)
    assert consent.store.versions == [] and consent.registry.find(ADDRESS) is None


def test_a_failed_secret_write_writes_no_row(consent: Consent) -> None:
    consent.store.failing_saves = 1
    with pytest.raises(TransientError):
        consent.service.complete(consent.signed_in())
    assert consent.registry.find(ADDRESS) is None, "a row must never point to a missing secret"


def test_an_expired_flow_is_refused(consent: Consent) -> None:
    form = consent.signed_in()
    for row in consent.flows.rows.values():
        row["expires_at"] -= timedelta(hours=1)
    with pytest.raises(ConsentProblem, match="expired"):
        consent.service.complete(form)
    assert consent.store.versions == []


def test_flow_storage_down_is_transient(consent: Consent) -> None:
    consent.flows.fail = True
    with pytest.raises(TransientError):
        consent.service.start(ADDRESS, redirect_uri=REDIRECT)


def test_a_reconsent_keeps_the_checkpoint_and_clears_the_failure(consent: Consent) -> None:
    consent.service.complete(consent.signed_in())
    consent.registry.record_checkpoint(ADDRESS, {"uidvalidity": 9, "last_uid": 17})
    consent.registry.record_failure(
        ADDRESS, error_class="needs_reconsent", error="revoked", consecutive_failures=3, needs_reconsent=True
    )
    result = consent.service.complete(consent.signed_in())
    row = consent.registry.get(ADDRESS)
    assert result.reconsent and (row.status, row.uidvalidity, row.last_uid) == (MailboxStatus.ACTIVE, 9, 17)
    assert row.consecutive_failures == 0 and len(consent.store.versions) == 2


@pytest.mark.parametrize(
    ("options", "field"), [({"after_action": "burn"}, "after_action"), ({"max_messages": "-1"}, "max_messages")]
)
def test_bad_options_are_refused_before_any_flow(consent: Consent, options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConsentProblem, match=field):
        consent.service.start(ADDRESS, redirect_uri=REDIRECT, options=options)
    assert consent.flows.rows == {}


def test_a_delegated_revoke_removes_the_secret_and_names_the_grant_at_entra(consent: Consent) -> None:
    consent.service.complete(consent.signed_in())

    revoked = consent.service.revoke(ADDRESS)

    assert revoked.existed and revoked.secret_purged and consent.store.removed == [ADDRESS]
    assert consent.registry.find(ADDRESS) is None and consent.store.versions == []
    assert "purged" in revoked.in_key_vault
    assert "Refresh tokens" in revoked.at_entra and "Revoke-MgUserSignInSession" in revoked.at_entra


def test_an_app_mode_revoke_touches_no_key_vault_and_names_the_exchange_permission(consent: Consent) -> None:
    consent.registry.put(Mailbox(ADDRESS, mode=MailboxMode.APP))

    revoked = consent.service.revoke(ADDRESS)

    assert revoked.existed and consent.registry.find(ADDRESS) is None
    assert consent.store.removed == []  # no Key Vault call of any kind
    assert "Nothing was stored in Key Vault" in revoked.in_key_vault
    assert f"Remove-MailboxPermission -Identity {ADDRESS}" in revoked.at_entra
    assert "RBAC for Applications" in revoked.at_entra
    for text in (revoked.in_key_vault, revoked.at_entra):
        assert "refresh token" not in text.lower() and "Revoke-MgUserSignInSession" not in text
