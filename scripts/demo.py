"""The main job, end to end, against the local stack (see scripts/demo.sh, which starts the stack first).

1. start the local Functions host with local.settings.json (written by ``python -m devstack start``);
2. authorize the demo mailbox in headless Chromium: admin link -> sign-in -> consent -> callback;
3. deliver sample mail to the mailbox in Dovecot;
4. fire the collector's timer through the host's admin endpoint;
5. print the envelopes that reached the queue, and the mailbox's status;
6. run the GLPI consumer (the code of the glpi_tickets function) over the queue and print the tickets it made in
   the GLPI stand-in;
7. deliver a reply carrying the first ticket's tag, collect and consume again, and print the follow-up.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from azure.core.exceptions import ResourceNotFoundError  # noqa: E402
from azure.storage.queue import QueueClient, TextBase64DecodePolicy  # noqa: E402

from devstack import dovecot  # noqa: E402
from devstack.browser import consent_in_browser  # noqa: E402
from devstack.glpi import control as glpi_control  # noqa: E402
from devstack.stack import describe  # noqa: E402

SAMPLES = [
    ("Alice Martin <alice@customer.example>", "Printer on floor 3 is jammed", "The printer says E-204 again."),
    ("Bob Chen <bob@customer.example>", "Réinitialisation du mot de passe", "Je n'arrive plus à me connecter."),
    ("Mail Delivery System <MAILER-DAEMON@customer.example>", "Undeliverable: your reply", "Delivery failed."),
]


def wait_for(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback http
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"demo: the local host did not answer at {url}; see .stack/logs/host.log") from None
            time.sleep(0.3)


def sample(sender: str, subject: str, body: str) -> bytes:
    return (
        ("Return-Path: <>\r\n" if "MAILER-DAEMON" in sender else "")
        + f"From: {sender}\r\nTo: Support <support@demo.example>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@customer.example>\r\nDate: Sun, 29 Nov 2026 09:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        f"{body}\r\n"
    ).encode()


def fire_collector(origin: str, master_key: str) -> None:
    request = urllib.request.Request(  # noqa: S310
        f"{origin}/admin/functions/collect_mail",
        data=b"{}",
        method="POST",
        headers={"x-functions-key": master_key, "content-type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=10).close()  # noqa: S310


def wait_for_queue(queue: QueueClient, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(list(queue.peek_messages(max_messages=32))) < count and time.monotonic() < deadline:
        time.sleep(0.5)


def tickets(info: dict[str, Any], values: dict[str, str], origin: str, mailbox: str, subjects: list[str]) -> int:
    """Steps 7 and 8: the GLPI consumer makes tickets of the queued mail, then a follow-up of a reply."""
    from consumers.glpi.__main__ import run
    from shared.settings import load_settings

    settings = load_settings(values)
    counts = run(settings, retry_visibility=0)
    print(f"7. GLPI consumer over the queue: {counts} (the bounce is refused, as GLPI's collector refuses it)")
    made = [
        t
        for t in glpi_control(info["glpi_url"], "GET", "state", cafile=info["ca_bundle"])["tickets"]
        if t["name"] in subjects
    ]
    for t in made:
        requester = next((a for a in t["actors"] if a["type"] == 1), {})
        text = re.sub(r"<[^>]+>", " ", t["content"].split("<p>Mail reference")[0]).strip()
        print(
            f"   - GLPI ticket #{t['id']}: {t['name']!r}, requester {requester.get('alternative_email') or '?'}: {text}"
        )
    if not made:
        return 1
    first = made[0]
    reply = sample(
        "Alice Martin <alice@customer.example>",
        f"Re: [GLPI #{first['id']:07d}] {first['name']}",
        "It works again after the restart, thank you!\r\n\r\nOn Sun, 29 Nov 2026, Support wrote:\r\n> We restarted it.",
    )
    dovecot.deliver(Path(info["dovecot_config"]), mailbox, reply)
    queue = QueueClient.from_connection_string(values["AzureWebJobsStorage"], values["MAIL_QUEUE_NAME"])
    fire_collector(origin, values["LOCAL_MASTER_KEY"])
    wait_for_queue(queue, 1)
    counts = run(settings, retry_visibility=0)
    ticket = next(
        t
        for t in glpi_control(info["glpi_url"], "GET", "state", cafile=info["ca_bundle"])["tickets"]
        if t["id"] == first["id"]
    )
    print(f"8. a reply with the tag [GLPI #{first['id']:07d}] was collected and consumed: {counts}")
    for followup in ticket["followups"]:
        text = followup["content"].split("<p>Mail reference")[0]
        print(f"   - follow-up #{followup['id']} on ticket #{ticket['id']}: {text}")
    return 0 if ticket["followups"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailbox", default="support@demo.example")
    parser.add_argument("--screenshot", type=Path, default=ROOT / ".stack" / "consent.png")
    args = parser.parse_args()
    info = describe()
    settings = json.loads((ROOT / "local.settings.json").read_text())["Values"]
    origin = info["host_origin"]
    log = (ROOT / ".stack" / "logs" / "host.log").open("ab")
    host = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "devstack.host", "--port", str(info["ports"]["host"])],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"{origin}/admin/host/ping", host)
        queue = QueueClient.from_connection_string(
            settings["AzureWebJobsStorage"], "incoming-mail", message_decode_policy=TextBase64DecodePolicy()
        )
        try:
            queue.clear_messages()  # show only what this run collects
        except ResourceNotFoundError:
            pass
        print(f"1. local Functions host is up at {origin}")

        link = f"{origin}/api/mailboxes/{quote(args.mailbox)}/authorize?code={settings['LOCAL_FUNCTION_KEY']}"
        page = consent_in_browser(
            link,
            login=args.mailbox,
            password=info["user_password"],
            trust_cert=Path(info["tls_cert"]),
            screenshot=args.screenshot,
        )
        message = page.text.strip().splitlines()[-1] if page.text.strip() else ""
        print(f"2. consent in Chromium: {page.title} -- {message}")
        print(f"   (screenshot: {args.screenshot})")
        if page.title != "Mailbox authorized":
            return 1

        for sender, subject, body in SAMPLES:
            dovecot.deliver(Path(info["dovecot_config"]), args.mailbox, sample(sender, subject, body))
        print(f"3. delivered {len(SAMPLES)} messages to {args.mailbox}")

        fire_collector(origin, settings["LOCAL_MASTER_KEY"])
        print("4. fired the collect_mail timer")

        envelopes: list[dict[str, object]] = []
        deadline = time.monotonic() + 60
        while len(envelopes) < len(SAMPLES) and time.monotonic() < deadline:
            time.sleep(0.5)
            envelopes = [json.loads(m.content) for m in queue.peek_messages(max_messages=32)]
        print(f"5. envelopes on the queue 'incoming-mail': {len(envelopes)}")
        for e in envelopes:
            sender = e.get("from") or []
            print(
                f"   - id={e['id']}\n     from={sender[0]['address'] if sender else '?'} subject={e['subject']!r}"
                f"\n     size={e['size']} sha256={str(e['sha256'])[:16]}... blob={e['blob']['name']}"  # type: ignore[index]
                f"\n     classification={e['classification']}"
            )
        status_request = urllib.request.Request(  # noqa: S310
            f"{origin}/api/mailboxes/{quote(args.mailbox)}", headers={"x-functions-key": settings["LOCAL_FUNCTION_KEY"]}
        )
        with urllib.request.urlopen(status_request, timeout=10) as r:  # noqa: S310
            row = json.loads(r.read())
        print(
            f"6. mailbox status: {row['status']}, last_uid={row['last_uid']}, collected_total={row['collected_total']}"
        )
        if len(envelopes) < len(SAMPLES):
            return 1
        return tickets(info, settings, origin, args.mailbox, [subject for _, subject, _ in SAMPLES])
    finally:
        host.terminate()
        host.wait(timeout=15)


if __name__ == "__main__":
    sys.exit(main())
