"""One side of benchmark 6d against the old path (``bench.empty_before_wire``): the empty run over many mailboxes,
in a process of its own, on the code of the tree it is started in (the current one, or an older commit's taken
from git by ``bench.empty_before_wire``).

The same file is copied into the older tree, so both sides do exactly the same thing. It therefore imports only
what every tree since the shared mailboxes has: the stack's isolated settings, ``build_services``, the consent
service, the registry, the token store's secret name (``shared.mailboxes.mailbox_key``) and ``Collector.run``;
and nothing from the rest of ``bench``, which differs between the trees.

Driven over stdin/stdout, one command a line; every answer is one line ``@@ {json}`` (anything else on stdout,
such as a library's print, is not an answer):

- ``setup``: authorize the first address through the real consent flow (start, the Entra stand-in's sign-in pages,
  callback), then register every other address as a shared mailbox of it: its registry row is the owner's with
  the address changed, signed in as the owner, and its Key Vault secret is a copy of the owner's token cache,
  under the address's own secret name, as a consent of its own would leave it. The Full Access grants in Dovecot
  are the caller's part (the stack's Dovecot, managed by the current tree).
- ``run``: one ``Collector.run`` (the timer's work on one worker), timed; the answer lists the mailboxes that did
  not end ``ok`` with nothing collected.
- ``close``: remove the workspace's queues, containers and tables, then exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

ANSWER = "@@ "
SETUP_THREADS = 8  # the Key Vault stand-in and Azurite answer one request at a time each


def addresses(tag: str, count: int) -> list[str]:
    """The side's mailboxes; the first one is the owner, the consented account."""
    return [f"{tag}-l{i:04d}@example.test" for i in range(count)]


class Side:
    def __init__(self, info: dict[str, Any], tag: str, count: int, imap_port: int) -> None:
        from collectors.services import build_services
        from devstack.stack import isolated_settings
        from shared.settings import load_settings

        self.info = info
        self.addresses = addresses(tag, count)
        env = isolated_settings(
            info,
            tag,
            COLLECT_TIME_BUDGET_SECONDS="3600",  # a benchmark run must not stop at the default budget
            IMAP_PORT=str(imap_port),
        )
        self.settings = load_settings(env)
        self.services = build_services(self.settings)

    def setup(self) -> dict[str, Any]:
        from shared import azure_clients
        from shared.mailboxes import mailbox_key

        started = time.perf_counter()
        owner, shared = self.addresses[0], self.addresses[1:]
        self._consent(owner)
        row = self.services.registry.get(owner)
        client = azure_clients.secret_client(self.settings)
        cache = client.get_secret(mailbox_key(owner))
        tags = dict(cache.properties.tags or {})

        def seed(address: str) -> None:
            client.set_secret(
                mailbox_key(address),
                cache.value or "",
                content_type=cache.properties.content_type,
                tags={**tags, "mailbox": address},
            )
            copy = dataclasses.replace(row, address=address, signed_in_as=owner)
            if hasattr(copy, "token_secret"):  # trees that name the secret in the row: the address's own
                copy = dataclasses.replace(copy, token_secret=mailbox_key(address))
            self.services.registry.put(copy)

        with ThreadPoolExecutor(SETUP_THREADS) as pool:
            list(pool.map(seed, shared))
        return {"seconds": time.perf_counter() - started, "mailboxes": len(self.addresses)}

    def _consent(self, address: str) -> None:
        from shared.errors import TransientError

        try:
            self._consent_once(address)
        except TransientError:
            # A loaded machine: the stand-in closed a kept-alive connection as it was reused. One new flow.
            self._consent_once(address)

    def _consent_once(self, address: str) -> None:
        import requests

        from tests.support.signin import sign_in

        session = requests.Session()
        session.trust_env = False
        session.verify = self.info["ca_bundle"]
        redirect_uri = f"{self.info['host_origin']}/api/auth/callback"
        auth_uri = self.services.consent.start(address, redirect_uri=redirect_uri, options={})
        fields = sign_in(
            auth_uri, login=address, password=self.info["user_password"], redirect_uri=redirect_uri, session=session
        )
        self.services.consent.complete(fields)

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        results = self.services.collector.run()
        seconds = time.perf_counter() - started
        bad = [r for r in results if str(r.outcome) != "ok" or r.messages or r.more]
        return {
            "seconds": seconds,
            "mailboxes": len(results),
            "failures": len(bad),
            "failed": [f"{r.address}: {r.outcome} {r.error[:200]}".strip() for r in bad[:5]],
        }

    def close(self) -> dict[str, Any]:
        left = remove_storage(self.settings)
        if not self.info.get("own_key_vault"):  # a private vault goes away with its process
            purge_secrets(self.settings, self.addresses)
        return {"left": left}


def remove_storage(settings: Any) -> list[str]:
    """Delete a workspace's queues, containers and tables (best effort); the names of the errors left."""
    from azure.core.exceptions import ResourceNotFoundError

    from shared import azure_clients

    s = settings
    steps = [
        lambda: azure_clients.queue(s, s.mail_queue).delete_queue(),
        lambda: azure_clients.queue(s, s.work_queue).delete_queue(),
        lambda: azure_clients.blob_service(s).delete_container(s.mail_container),
        lambda: azure_clients.blob_service(s).delete_container(s.lease_container),
        lambda: azure_clients.table_service(s).delete_table(s.mailbox_table),
        lambda: azure_clients.table_service(s).delete_table(s.consent_table),
    ]
    left: list[str] = []
    for step in steps:
        try:
            step()
        except ResourceNotFoundError:
            pass
        except Exception as e:  # cleanup goes on; the names are unique anyway
            left.append(type(e).__name__)
    return left


def purge_secrets(settings: Any, addresses: list[str]) -> None:
    """Delete and purge the mailboxes' token secrets (best effort: never written, or already gone)."""
    from shared import azure_clients
    from shared.mailboxes import mailbox_key

    client = azure_clients.secret_client(settings)

    def purge(address: str) -> None:
        try:
            client.begin_delete_secret(mailbox_key(address)).wait()
            client.purge_deleted_secret(mailbox_key(address))
        except Exception:  # never written, or already gone
            pass

    with ThreadPoolExecutor(SETUP_THREADS) as pool:
        list(pool.map(purge, addresses))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.empty_side")
    parser.add_argument("--info", required=True, help="the stack's description, a JSON file")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--mailboxes", type=int, required=True)
    parser.add_argument("--imap-port", type=int, required=True, help="the latency proxy's port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
    from shared import redaction

    redaction.install()
    with open(args.info) as f:
        info = json.load(f)
    answers = sys.stdout
    sys.stdout = sys.stderr  # only answers go to the caller's pipe
    side = Side(info, args.tag, args.mailboxes, args.imap_port)
    commands = {"setup": side.setup, "run": side.run, "close": side.close}
    for line in sys.stdin:
        command = line.strip()
        if command not in commands:
            answer: dict[str, Any] = {"error": f"unknown command {command!r}"}
        else:
            try:
                answer = commands[command]()
            except Exception as e:  # the caller reports it and stops; the traceback goes to this side's log
                logging.getLogger("bench.empty_side").exception("command=%s failed", command)
                answer = {"error": f"{command}: {type(e).__name__}: {str(e)[:300]}"}
        answers.write(ANSWER + json.dumps(answer) + "\n")
        answers.flush()
        if command == "close":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
