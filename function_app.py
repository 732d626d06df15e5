"""Azure Functions entry point (v2 programming model). It only wires: the HTTP routes come from the Blueprints in
``api/`` (see its docstring for the route table), and the triggers below call plain code in ``collectors`` and
``consumers``.

Queue: glpi_tickets on %MAIL_QUEUE_NAME% turns envelopes into GLPI tickets and follow-ups (consumers/glpi); it is off
until GLPI is configured (app setting AzureWebJobs.glpi_tickets.Disabled).
Timer: collect_mail on %COLLECT_SCHEDULE% (six-field NCRONTAB) collects the due mailboxes in-process or, when there
are more than one instance should take, puts one work item per mailbox on %WORK_QUEUE_NAME% for collect_work.
"""

from __future__ import annotations

import logging

import azure.functions as func

from api import admin, consent, operations
from collectors.scheduled import run_scheduled
from collectors.services import get_services
from shared import invocation_logs, redaction

redaction.install()
# The Azure SDKs log every HTTP request at INFO; keep Application Insights for the app's own lines.
logging.getLogger("azure").setLevel(logging.WARNING)
# At DEBUG imapclient logs every line it reads, whole messages included: mail content stays out of the logs.
logging.getLogger("imapclient").setLevel(logging.INFO)

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(consent.blueprint)
app.register_functions(admin.blueprint)
app.register_functions(operations.blueprint)


@app.timer_trigger(schedule="%COLLECT_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=True)
def collect_mail(timer: func.TimerRequest, context: func.Context) -> None:
    """Collect every active mailbox. Failures are recorded per mailbox; the run itself only fails on configuration."""
    # The collector logs from its own threads: they carry this invocation, or the host drops their lines.
    with invocation_logs.invocation(context.thread_local_storage, context.invocation_id):
        run_scheduled(get_services(), past_due=timer.past_due)


@app.queue_trigger(arg_name="item", queue_name="%WORK_QUEUE_NAME%", connection="AzureWebJobsStorage")
def collect_work(item: func.QueueMessage, context: func.Context) -> None:
    """Collect the one mailbox a work item names (fan-out across instances; the lease keeps each mailbox single)."""
    with invocation_logs.invocation(context.thread_local_storage, context.invocation_id):
        get_services().collector.collect_work_item(item.get_body().decode("utf-8", errors="replace"))


@app.queue_trigger(arg_name="envelope", queue_name="%MAIL_QUEUE_NAME%", connection="AzureWebJobsStorage")
def glpi_tickets(envelope: func.QueueMessage, context: func.Context) -> None:
    """Make the envelope's message a GLPI ticket or follow-up, once. A failure puts it back on the queue, for
    longer after each attempt (consumers/glpi/retries.py)."""
    from consumers.glpi.service import get_consumer, get_mail_queue, handle_queue_message  # imported on first use

    with invocation_logs.invocation(context.thread_local_storage, context.invocation_id):
        handle_queue_message(
            get_consumer(),
            get_mail_queue(),
            envelope.get_body().decode("utf-8", errors="replace"),
            message_id=envelope.id or "",
            pop_receipt=envelope.pop_receipt,
            dequeue_count=envelope.dequeue_count or 1,
            expires_on=envelope.expiration_time,
        )
