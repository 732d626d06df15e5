"""One logging set-up for every entry point: the function app, the command line and the local host.

What it guarantees wherever the code runs: the redaction filter sits in front of every handler; the Azure SDKs'
per-request lines stay out unless asked for; and mail content never reaches a log, whatever the level.
"""

from __future__ import annotations

import logging

from shared import redaction

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# At INFO the Azure SDKs log every request and response with its headers (2.5 MB for a run of a thousand
# messages), burying the one line per mailbox that an operator reads.
SDK_LOGGER = "azure"
# At DEBUG imapclient logs every line it reads, whole messages included: mail content stays out of the logs.
MAIL_CONTENT_LOGGER = "imapclient"


def configure_logging(*, level: int = logging.INFO, sdk_requests: bool = False) -> None:
    """Set up the process's logging once; calling it again changes nothing that an earlier call set up.

    ``level`` applies only when no handler exists yet (the Functions worker and test runners bring their own).
    ``sdk_requests`` keeps the Azure SDKs' request lines (for a troubleshooting run). imapclient stays at INFO in
    every case; its wire trace can only be turned on by setting that logger's level explicitly.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=FORMAT)
    redaction.install(root)
    logging.getLogger(SDK_LOGGER).setLevel(logging.NOTSET if sdk_requests else logging.WARNING)
    logging.getLogger(MAIL_CONTENT_LOGGER).setLevel(logging.INFO)
