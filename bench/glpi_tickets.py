"""Benchmark 7, GLPI tickets: envelopes on the queue made into GLPI tickets through a proxy adding 20 ms RTT.

Figure: tickets per second of the consumer as the function app runs it (``TicketConsumer.handle`` on a batch of
four messages at a time, as host.json's ``batchSize``; blob read, state table, GLPI calls, queue delete).
Baseline: a sequential floor doing only the same GLPI calls, one after another, in one reused session: the user
search, the ticket, and for every fourth message a document and its link. Same messages, same proxy, same run;
the runs alternate and the medians are compared.
"""

from __future__ import annotations

import json
import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import requests

from bench.common import Row, Timer, Workspace, median, say
from bench.latency_proxy import LatencyProxy

GOAL = 1.0
HANDLERS = 6  # host.json: batchSize 4 plus newBatchThreshold 2 invocations at a time per instance


def _mail(serial: int, rng: random.Random) -> bytes:
    sender = f"user{serial}-{uuid.uuid4().hex[:6]}@example.org"
    text = " ".join(rng.choice(("printer", "network", "screen", "slow", "broken", "please", "help")) for _ in range(80))
    head = (
        f"From: <{sender}>\r\nTo: support@example.test\r\nSubject: Bench {serial}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
    )
    if serial % 4:
        return (head + f"Content-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n").encode()
    attachment = rng.randbytes(20_000).hex().encode()[:20_000]
    return (
        (
            head
            + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            + "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{text}\r\n--b\r\nContent-Type: application/octet-stream\r\n"
            f'Content-Disposition: attachment; filename="log{serial}.txt"\r\n\r\n'
        ).encode()
        + attachment
        + b"\r\n--b--\r\n"
    )


def _enqueue(ws: Workspace, messages: list[bytes], uidvalidity: int) -> None:
    from collectors.envelope import build_envelope
    from shared import azure_clients

    container = azure_clients.container(ws.settings, ws.settings.mail_container)
    queue = azure_clients.queue(ws.settings, ws.settings.mail_queue)
    mailbox = ws.address("glpi")

    def one(item: tuple[int, bytes]) -> None:
        uid, raw = item
        name = f"{mailbox}/{uidvalidity}/{uid}.eml"
        blob = container.get_blob_client(name)
        blob.upload_blob(raw, overwrite=True)
        envelope = build_envelope(
            raw, mailbox=mailbox, folder="INBOX", uidvalidity=uidvalidity, uid=uid, blob_url=blob.url,
            blob_name=name, blob_container=ws.settings.mail_container, collected_at=datetime.now(UTC),
        )  # fmt: skip
        queue.send_message(json.dumps(envelope))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, enumerate(messages, 1)))


def _consume(ws: Workspace, glpi_url: str) -> int:
    """Drain the queue as the Functions host does: a batch at a time, HANDLERS invocations side by side."""
    from consumers.glpi.service import build_consumer
    from shared import azure_clients
    from shared.settings import load_settings

    settings = load_settings({**ws.env, "GLPI_URL": glpi_url})
    consumer = build_consumer(settings)
    queue = azure_clients.queue(settings, settings.mail_queue)
    done = 0
    try:
        with ThreadPoolExecutor(HANDLERS) as pool:
            while True:
                batch = list(queue.receive_messages(max_messages=HANDLERS * 2, visibility_timeout=600))
                if not batch:
                    return done

                def handle(message: Any) -> str:
                    status = consumer.handle(message.content).status
                    queue.delete_message(message)
                    return status

                done += sum(1 for status in pool.map(handle, batch) if status == "ticket")
    finally:
        consumer.close()


def _floor(info: dict[str, Any], glpi_url: str, messages: list[bytes]) -> int:
    """The same GLPI calls, one after another, in one session; nothing else."""
    from consumers.glpi.content import parse_message

    http = requests.Session()
    http.trust_env = False
    http.verify = info["ca_bundle"]
    base = {"App-Token": info["glpi_app_token"], "Accept": "application/json"}
    token = http.get(
        f"{glpi_url}/initSession", headers={**base, "Authorization": f"user_token {info['glpi_user_token']}"}
    ).json()["session_token"]
    headers = {**base, "Session-Token": token}
    made = 0
    for raw in messages:
        mail = parse_message(raw, max_attachment_bytes=10**7)
        sender = raw.split(b"From: <", 1)[1].split(b">", 1)[0].decode()
        params = {"criteria[0][field]": "5", "criteria[0][searchtype]": "equals", "criteria[0][value]": sender}
        http.get(f"{glpi_url}/search/User", params=params, headers=headers).raise_for_status()
        ticket = http.post(
            f"{glpi_url}/Ticket",
            json={"input": {"name": "floor", "content": mail.html, "_users_id_requester": 0}},
            headers=headers,
        )
        ticket.raise_for_status()
        for attachment in mail.attachments:
            manifest = json.dumps({"input": {"_filename": [attachment.filename]}})
            files = {"uploadManifest": (None, manifest), "filename[0]": (attachment.filename, attachment.data)}
            document = http.post(f"{glpi_url}/Document", files=files, headers=headers)
            document.raise_for_status()
            link = {"documents_id": document.json()["id"], "itemtype": "Ticket", "items_id": ticket.json()["id"]}
            http.post(f"{glpi_url}/Document_Item", json={"input": [link]}, headers=headers).raise_for_status()
        made += 1
    http.get(f"{glpi_url}/killSession", headers=headers)
    return made


def run(info: dict[str, Any], *, messages: int = 200, repeat: int = 3, delay_ms: float = 10.0) -> list[Row]:
    rng = random.Random(14)
    ws = Workspace(info, "glpi")
    consumer_rates: list[float] = []
    floor_rates: list[float] = []
    try:
        with LatencyProxy(info["ports"]["glpi"], delay_ms=delay_ms) as port:
            glpi_url = f"https://localhost:{port}/apirest.php"
            for round_ in range(repeat):
                batch = [_mail(i, rng) for i in range(messages)]
                timer = Timer()
                made = _floor(info, glpi_url, batch)
                floor_rates.append(made / timer.elapsed())
                _enqueue(ws, batch, uidvalidity=1000 + round_)
                timer = Timer()
                made = _consume(ws, glpi_url)
                consumer_rates.append(made / timer.elapsed())
                if made != messages:
                    raise RuntimeError(f"the consumer made {made} tickets from {messages} messages")
                say(f"glpi round {round_ + 1}: consumer {consumer_rates[-1]:.1f}/s, floor {floor_rates[-1]:.1f}/s")
    finally:
        from shared import azure_clients

        azure_clients.table_service(ws.settings).delete_table(ws.env["GLPI_STATE_TABLE_NAME"])
        ws.close()
    figure, floor = median(consumer_rates), median(floor_rates)
    ratio = figure / floor
    return [
        Row(
            "glpi tickets",
            f"{figure:.1f} tickets/s ({messages} messages, 1 in 4 with a 20 KB file, {2 * delay_ms:.0f} ms RTT)",
            f"{floor:.1f} tickets/s (the same GLPI calls in sequence)",
            ratio,
            f">= {GOAL}x",
            ratio >= GOAL,
        )
    ]
