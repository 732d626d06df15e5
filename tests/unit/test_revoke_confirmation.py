"""The status page's revoke confirmation says what the revoke removes in the mailbox's mode."""

from __future__ import annotations

from api.status_page import render_confirm_revoke

ADDRESS = "helpdesk@contoso.example"


def test_a_delegated_mailbox_s_confirmation_names_its_token_in_key_vault() -> None:
    html = render_confirm_revoke(ADDRESS, "csrf-value")
    assert "token is deleted from Key Vault" in html and "new sign-in" in html
    assert f"name=confirm value='{ADDRESS}'" in html


def test_an_app_mode_mailbox_s_confirmation_names_exchange_and_no_token() -> None:
    html = render_confirm_revoke(ADDRESS, "csrf-value", app_mode=True)
    assert "Nothing of it is in Key Vault" in html and "in Exchange" in html
    assert "token" not in html.lower() and "sign-in" not in html
    assert f"name=confirm value='{ADDRESS}'" in html
