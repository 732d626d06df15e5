"""The timer's work, as plain code: check the client credential, then collect the due mailboxes in this worker or,
when there are more than one instance should take, put one work item per mailbox on the work queue."""

from __future__ import annotations

import logging

from collectors.services import Services

logger = logging.getLogger(__name__)


def run_scheduled(services: Services, *, past_due: bool) -> None:
    """One scheduled run. Failures are recorded per mailbox; only a configuration error raises."""
    if past_due:
        logger.warning("collection run is past due; collecting now")
    services.credential_check.run()
    due = services.collector.due_mailboxes()
    if services.collector.fan_out_needed(len(due)):
        services.collector.fan_out(due, services.work_queue())
        return
    results = services.collector.run(due)
    failed = [r for r in results if r.outcome.failed]
    logger.info(
        "collect run mailboxes=%d messages=%d failed=%d",
        len(results),
        sum(r.messages for r in results),
        len(failed),
    )
