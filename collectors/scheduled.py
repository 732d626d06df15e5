"""The timer's work, as plain code: check the client credential, then collect the due mailboxes in this worker or,
when there are more than one instance should take, put one work item per mailbox on the work queue."""

from __future__ import annotations

import logging

from collectors.operations import keep_alive_due
from collectors.services import Services
from shared.errors import CollectorError
from shared.registry import Mailbox, utcnow

logger = logging.getLogger(__name__)


def run_scheduled(services: Services, *, past_due: bool) -> None:
    """One scheduled run. Failures are recorded per mailbox; only a configuration error raises."""
    if past_due:
        logger.warning("collection run is past due; collecting now")
    services.credential_check.run()
    # The planning's listing serves the keep-alive too: at 2,000 mailboxes each listing is a few pages of rows.
    mailboxes = services.registry.list()
    due = services.collector.due_mailboxes(mailboxes)
    if services.collector.fan_out_needed(len(due)):
        services.collector.fan_out(due, services.work_queue())
        logger.info("collect run completed mode=fan_out mailboxes=%d", len(due))
        # The fan-out wrote only the rows' work-item columns, which the reports do not read: its listing serves them.
        upkeep(services, mailboxes, run_wrote=False)
        return
    results = services.collector.run(due)
    failed = [r for r in results if r.outcome.failed]
    # The heartbeat alert reads this line: no "collect run completed" for three periods means the timer, the app or
    # its deployment is broken, which no per-mailbox line can say.
    logger.info(
        "collect run completed mode=in_process mailboxes=%d messages=%d failed=%d",
        len(results),
        sum(r.messages for r in results),
        len(failed),
    )
    upkeep(services, mailboxes)


def upkeep(services: Services, mailboxes: list[Mailbox] | None = None, *, run_wrote: bool = True) -> None:
    """After the collection: keep unused refresh tokens alive (of ``mailboxes``, the run's listing, when given),
    write the daily lines about mailboxes that need someone (re-consent, a token that will expire) and the line for
    each mailbox not collected for an hour or more; delete expired consent flows. A failure here is logged; it never
    fails the run.

    The reports read the rows fresh when the run has just written them (``run_wrote``: collected in this process).
    Otherwise the listing serves, with only the rows the keep-alive may have written read again: at 2,000 mailboxes
    a second listing is a few pages of rows and seconds of the timer's run."""
    services.consent.purge_expired_flows()
    try:
        listed = services.registry.list() if mailboxes is None else mailboxes
        now = utcnow()
        renewing = {m.address for m in listed if keep_alive_due(m, now)}
        services.operations.keep_alive(listed)
        if run_wrote or mailboxes is None:
            fresh = services.registry.list()
        else:
            fresh = [m for m in listed if m.address not in renewing]
            fresh += [m for m in map(services.registry.find, sorted(renewing)) if m is not None]
        services.operations.report_daily(fresh)
        services.operations.report_stale(fresh)
    except CollectorError as e:
        logger.warning("upkeep failed error_class=%s error=%s", e.error_class, e.describe())
