"""The local host's queue trigger: how long a taken message stays hidden while its function runs."""

from __future__ import annotations

import pytest

from devstack.host import HostError
from devstack.host.queues import QUEUE_PROCESSING_VISIBILITY_SECONDS, VISIBILITY_SETTING, processing_visibility


def test_a_taken_message_stays_hidden_for_azure_s_ten_minutes_by_default() -> None:
    assert processing_visibility({}) == QUEUE_PROCESSING_VISIBILITY_SECONDS == 600
    assert processing_visibility({VISIBILITY_SETTING: " "}) == 600


def test_the_local_setting_shortens_it_for_tests() -> None:
    assert processing_visibility({VISIBILITY_SETTING: "75"}) == 75


@pytest.mark.parametrize("value", ["0", "-5", "601", "1.5", "ten", "75s", "1e3", "٣"])
def test_a_bad_visibility_setting_stops_the_host_with_the_range(value: str) -> None:
    with pytest.raises(HostError, match="whole number of seconds from 1 to 600"):
        processing_visibility({VISIBILITY_SETTING: value})
