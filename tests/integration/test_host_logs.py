"""The local host passes on an app's log records as the Python worker and the Functions host do: a record from a
thread the app started reaches the log only when that thread carries the invocation id
(``context.thread_local_storage.invocation_id``), and never after the invocation has ended."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

from tests.support.net import free_port, wait_until
from tests.support.processes import stop_process

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

APP = """
    import logging
    import threading
    import time

    import azure.functions as func

    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
    log = logging.getLogger("example")
    late = []


    @app.route(route="threads")
    def threads(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
        log.warning("line=own-thread")

        def plain() -> None:
            log.warning("line=plain-thread")

        def carried() -> None:
            context.thread_local_storage.invocation_id = context.invocation_id
            log.warning("line=carried-thread")

        def after_the_end() -> None:
            time.sleep(0.5)
            context.thread_local_storage.invocation_id = context.invocation_id
            log.warning("line=after-the-end")

        for target in (plain, carried):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
        threading.Thread(target=after_the_end).start()
        return func.HttpResponse("done")
"""


def test_records_from_other_threads_reach_the_log_only_with_the_running_invocation_id(tmp_path: Path) -> None:
    (tmp_path / "function_app.py").write_text(textwrap.dedent(APP))
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if k not in ("LOCAL_FUNCTION_KEY", "LOCAL_MASTER_KEY")}
    log_path = tmp_path / "host.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "devstack.host", "--app-dir", str(tmp_path), "--port", str(port)],
            cwd=REPO,
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    session = requests.Session()
    session.trust_env = False
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return session.get(f"{base}/admin/host/ping", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_until(answers, 30, "the host", process=process, log=log_path)
        assert session.get(f"{base}/api/threads", timeout=20).text == "done"
        time.sleep(1.0)  # the late thread logs after the invocation ended
    finally:
        stop_process(process, timeout=15)
    output = log_path.read_text()
    assert "line=own-thread" in output
    assert "line=carried-thread" in output
    assert "line=plain-thread" not in output, "a record without the invocation id reached the log"
    assert "line=after-the-end" not in output, "a record of a finished invocation reached the log"
    assert "invocation function=threads" in output, "the host's own lines are kept"
