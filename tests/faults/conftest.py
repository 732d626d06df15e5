"""The fault suite's figures: each mail case records what it delivered, lost and duplicated (tests/support/faults.py);
at the end of the session they are printed and written to ``<stack run dir>/faults-report.json``.
"""

from __future__ import annotations

import pytest

from tests.support.faults import LEDGER


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LEDGER.cases and not LEDGER.checks:
        return
    from devstack.stack import run_dir

    totals = LEDGER.totals()
    path = run_dir() / "faults-report.json"
    LEDGER.write(path)
    terminalreporter.write_sep("-", "fault suite figures")
    terminalreporter.write_line(
        "cases={cases} mail_cases={mail_cases} delivered={delivered} envelopes={envelopes} lost={lost} "
        "duplicates={duplicates} duplicates_same_id={duplicates_same_id} new_ids={new_ids}".format(**totals)
    )
    terminalreporter.write_line(f"per case: {path}")
