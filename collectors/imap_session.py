"""One authenticated IMAP connection to a mailbox: TLS with certificate checks, SASL XOAUTH2, and the few commands
the collector needs. Server answers become the app's errors here, each saying what to do.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterable
from types import TracebackType
from typing import Any, Protocol

from imapclient import IMAPClient, SocketTimeout
from imapclient import exceptions as imap_errors
from imapclient.response_parser import parse_fetch_response
from imapclient.tls import IMAP4_TLS

from shared.after_action import AfterAction, Step
from shared.errors import AfterActionError, MailboxAccessError, TransientError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0  # seconds
READ_TIMEOUT = 120.0  # seconds without a byte from the server; a 150 MB message still streams within it
# Exchange Online: "BAD Request is throttled. Suggested Backoff Time: 2470 milliseconds" (then it disconnects).
_THROTTLED = re.compile(r"Request is throttled\.?\s*Suggested Backoff Time:\s*(\d+)\s*milli", re.IGNORECASE)
# Exchange Online: "BAD User is authenticated but not connected." to the first command after a login whose token's
# account cannot open the mailbox named in user= (a delegate without Full Access), then "* BYE".
NOT_CONNECTED = "authenticated but not connected"
DEFAULT_THROTTLE_BACKOFF = 60.0  # seconds, when the server says "throttled" without a figure
SEEN = b"\\Seen"
IMAPLIB_LOGGER = "imapclient.imaplib"  # where imapclient sends imaplib's wire trace (DEBUG)
# Bytes of mail requested beyond the batch being read: the server streams them while this batch is handled, so
# the link stays busy across batches. Sized against the measured round trip (20-80 ms to Exchange Online): a
# round trip's worth at WINDOW_RATE, within these bounds. Unread answers wait in the socket buffers.
WINDOW_RATE = 100 * 1024 * 1024  # bytes per second the window is sized for (above what one link carries)
WINDOW_MIN = 4 * 1024 * 1024
WINDOW_MAX = 16 * 1024 * 1024
GUESSED_SIZE = 64 * 1024  # bytes counted for a message whose size was not asked
DEFAULT_RTT = 0.05  # seconds, until a round trip has been measured
STREAM_CHUNK = 1024 * 1024  # bytes read from the socket at a time for a streamed message


class ChunkSink(Protocol):
    """Where a streamed message's bytes go as they arrive (collectors.sinks.RawWriter, an envelope stream)."""

    def write(self, chunk: bytes) -> None: ...


SinkFor = Callable[[int], ChunkSink]  # the sink of a streamed message, by its UID


@functools.cache
def _tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """One verifying TLS context per CA bundle, shared by every session: loading the certificates takes about
    20 ms, once per mailbox and run otherwise. A context is safe to share between threads."""
    return ssl.create_default_context(cafile=ca_bundle)


class TlsSessions:
    """The last resumable TLS session of each server (host, port, TLS context), offered to the next connection.

    A resumed handshake skips the certificate chain's verification and the server's signature: CPU on both sides,
    per mailbox and run, which is most of an empty mailbox's handshake. A server that does not know the session
    (expired, another front end, a rotated ticket key) simply does a full handshake, and that connection's session
    replaces the old one. With TLS 1.3 the ticket arrives after the handshake, so a session is taken once the
    greeting has been read. Thread-safe: the sessions of one process are shared by its collector threads.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock  # wall-clock seconds, as the sessions' issue times
        self._lock = threading.Lock()
        self._sessions: dict[tuple[str, int, ssl.SSLContext], ssl.SSLSession] = {}

    @staticmethod
    def _key(host: str, port: int, context: ssl.SSLContext) -> tuple[str, int, ssl.SSLContext]:
        return host.lower(), port, context  # a session may only be offered through the context that made it

    def get(self, host: str, port: int, context: ssl.SSLContext) -> ssl.SSLSession | None:
        """The session to offer, or None when there is none or its ticket has expired."""
        key = self._key(host, port, context)
        with self._lock:
            session = self._sessions.get(key)
            if session is not None and self._clock() >= session.time + session.ticket_lifetime_hint:
                del self._sessions[key]
                session = None
        return session

    def keep(self, host: str, port: int, context: ssl.SSLContext, sock: ssl.SSLSocket) -> None:
        """Keep the connection's session when the server gave one that can be resumed."""
        session = sock.session
        if session is None or not session.has_ticket or session.ticket_lifetime_hint <= 0:
            return
        with self._lock:
            self._sessions[self._key(host, port, context)] = session


TLS_SESSIONS = TlsSessions()


class _Wire(IMAP4_TLS):  # type: ignore[misc]
    """imaplib over TLS, minus three costs: TCP_NODELAY, so that a short command is not held back by Nagle's
    algorithm waiting for the acknowledgement of the previous one (about 40 ms each at AUTHENTICATE and at the first
    command after it); the greeting's capabilities used when it lists them, instead of a CAPABILITY round trip; and
    the server's last TLS session offered for resumption (``TlsSessions``).
    """

    def __init__(
        self, host: str, port: int, ssl_context: ssl.SSLContext, timeout: float | None, sessions: TlsSessions
    ) -> None:
        self._sessions = sessions
        super().__init__(host, port, ssl_context, timeout)  # connects and reads the greeting
        self._sessions.keep(self.host, self.port, self.ssl_context, self.sock)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self._timeout if timeout is None else timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            offered = self._sessions.get(self.host, self.port, self.ssl_context)
            tls: ssl.SSLSocket = self.ssl_context.wrap_socket(sock, server_hostname=self.host, session=offered)
            return tls
        except BaseException:
            sock.close()
            raise

    @property
    def resumed(self) -> bool:
        """Whether this connection's TLS handshake resumed an earlier session."""
        return bool(self.sock.session_reused)

    def _get_capabilities(self) -> None:
        greeted = self.untagged_responses.pop("CAPABILITY", None)  # "* OK [CAPABILITY ...] ready."
        if greeted and greeted[-1]:
            self.capabilities = tuple(str(greeted[-1], "ascii", "replace").upper().split())
        else:
            super()._get_capabilities()


class _Client(IMAPClient):  # type: ignore[misc]
    def __init__(self, host: str, *, sessions: TlsSessions, **options: object) -> None:
        self._sessions = sessions
        super().__init__(host, **options)

    def _create_IMAP4(self) -> _Wire:  # noqa: N802 - imapclient's name
        return _Wire(self.host, self.port, self.ssl_context, getattr(self._timeout, "connect", None), self._sessions)


_LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}\r\n$")  # a line announcing a literal of that many bytes
_UID_ITEM = re.compile(rb"[( ]UID (\d+)", re.IGNORECASE)
_SIZE_ITEM = re.compile(rb"[( ]RFC822\.SIZE (\d+)", re.IGNORECASE)


def _folder_argument(client: IMAPClient, folder: str) -> bytes:
    """The folder as SELECT's argument: modified UTF-7 and quoted, as imapclient sends it."""
    argument: bytes = client._normalise_folder(folder)
    return argument


def _sizes_command(last_uid: int) -> bytes:
    return f"UID FETCH {last_uid + 1}:* (UID RFC822.SIZE)".encode()


def _throttle(text: str) -> TransientError | None:
    match = _THROTTLED.search(text)
    if match is None and "throttled" not in text.lower():
        return None
    backoff = int(match.group(1)) / 1000 if match else DEFAULT_THROTTLE_BACKOFF
    return TransientError(
        f"the IMAP server is throttling this mailbox (suggested backoff {backoff:.1f} s)",
        remedy="nothing to do: the mailbox is skipped until the backoff has passed",
        retry_after=backoff,
    )


class ImapSession:
    """Context manager: connects and authenticates on enter, always logs out on exit.

    Every method raises TransientError (network, timeout, throttling: retry next run) or MailboxAccessError
    (the server refuses this mailbox or folder: an admin must act).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        address: str,
        access_token: str,
        ca_bundle: str | None = None,
        signed_in_as: str = "",
        refused: Callable[[], MailboxAccessError] | None = None,
        tls_sessions: TlsSessions = TLS_SESSIONS,
    ) -> None:
        """``refused``: the error for a refused login when the generic one would mislead (an app-only token).
        ``tls_sessions``: where the servers' TLS sessions are kept for resumption (the process's own by default)."""
        self._host, self._port = host, port
        self._tls_sessions = tls_sessions
        self._address = address
        self._token = access_token
        self._signed_in_as = signed_in_as or address
        self._refused = refused
        self._context = _tls_context(ca_bundle)
        self._client: IMAPClient | None = None
        self._created: set[str] = set()
        self._requested: dict[bytes, list[int]] = {}  # FETCH tag -> its UIDs, until the caller has the answer
        self._in_flight: set[bytes] = set()  # FETCH tags whose completion has not been read yet
        self._bodies: dict[int, bytes] = {}  # bodies read so far for requested UIDs, whatever command they came with
        self._sizes_ahead: tuple[int, dict[int, int]] | None = None  # new_sizes() answer read with SELECT's
        self._done: dict[bytes, tuple[bytes, bytes]] = {}  # FETCH completions read while reading an earlier one
        self._sizes: dict[int, int] = {}  # every size learned, for the pipelining window
        self._streaming: tuple[bytes, int, SinkFor] | None = None  # tag, UID, sink being read
        self.rtt = DEFAULT_RTT  # seconds: SELECT's round trip, once measured

    def __enter__(self) -> ImapSession:
        try:
            self._client = _Client(
                self._host,
                sessions=self._tls_sessions,
                port=self._port,
                ssl=True,
                ssl_context=self._context,
                timeout=SocketTimeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT),
            )
        except (OSError, imap_errors.IMAPClientError) as e:
            raise TransientError(f"cannot connect to IMAP {self._host}:{self._port}: {type(e).__name__}: {e}") from e
        if not logging.getLogger(IMAPLIB_LOGGER).isEnabledFor(logging.DEBUG):
            # imapclient sets imaplib's debug level to 5, at which imaplib formats a repr() of every answer, message
            # bodies included, before the logger drops it: a 25 MB message cost 100 MB of text and its CPU time.
            self._client._imap.debug = 0
        logger.debug("IMAP connected host=%s tls_resumed=%s", self._host, self._client._imap.resumed)
        try:
            self._login(self._client)
        except imap_errors.LoginError as e:
            self._close()
            raise self._login_error(str(e)) from None
        except Exception as e:
            self._close()
            raise self._translate(e) from e
        finally:
            self._token = ""  # not needed after the login; keep it out of later tracebacks
        return self

    def _login(self, client: IMAPClient) -> None:
        """SASL XOAUTH2, with the initial response in the command (SASL-IR, RFC 4959) when the server offers it:
        one round trip instead of two. The capabilities in the answer are kept for the session, because SELECT
        clears imaplib's untagged answers and imapclient would ask again with CAPABILITY."""
        imap = client._imap
        if "SASL-IR" in imap.capabilities:
            sasl = base64.b64encode(f"user={self._address}\x01auth=Bearer {self._token}\x01\x01".encode())
            tag = imap._new_tag()
            imap.send(tag + b" AUTHENTICATE XOAUTH2 " + sasl + b"\r\n")  # sent as is: imaplib's trace never sees it
            del sasl
            while imap.tagged_commands[tag] is None:
                if imap._get_response() is None:
                    # A refused token gets a challenge with the error details (RFC 7628): an empty answer ends it.
                    imap.send(b"\r\n")
            status, data = imap.tagged_commands.pop(tag)
            if status != "OK":
                raise imap_errors.LoginError(f"AUTHENTICATE failed: {status} {data!r}"[:300])
            imap.state = "AUTH"
        else:
            client.oauth2_login(self._address, self._token)
        if "CAPABILITY" in imap.untagged_responses:
            client.capabilities()  # caches the login answer's list; asks nothing when it is there

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._close()

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        # LOGOUT is sent, not waited for: the answer tells nothing the run needs, and waiting costs a round trip.
        with contextlib.suppress(Exception):
            client._imap.send(client._imap._new_tag() + b" LOGOUT\r\n")
        with contextlib.suppress(Exception):
            client.shutdown()

    def _not_connected(self, text: str) -> MailboxAccessError | None:
        """Exchange accepts the token of an account that cannot open the mailbox in ``user=``, then answers the next
        command (SELECT, NAMESPACE, LIST, whichever comes) with "BAD User is authenticated but not connected.".
        """
        if NOT_CONNECTED not in text.lower():
            return None
        if self._refused is not None:  # app mode: the app's service principal has no access to this mailbox
            return self._refused()
        return MailboxAccessError(
            f"IMAP accepted the token of {self._signed_in_as} but cannot open the mailbox {self._address} "
            "('User is authenticated but not connected')",
            remedy=f"the account {self._signed_in_as} has no access to this mailbox: give it Full Access "
            f"(Add-MailboxPermission -Identity {self._address} -User {self._signed_in_as} -AccessRights FullAccess) "
            "and authorize with delegate=, or authorize the mailbox signed in as itself; also check that IMAP is "
            "enabled for the mailbox (Exchange admin center: mailbox > Email apps)",
        )

    def _login_error(self, text: str) -> Exception:
        throttled = _throttle(text)
        if throttled:
            return throttled
        if self._refused is not None:
            return self._refused()
        not_connected = self._not_connected(text)
        if not_connected:
            return not_connected
        if self._signed_in_as.lower() != self._address.lower():
            # A delegate's token is valid (the identity provider issued it), so the likely cause is the delegate's
            # access to this mailbox, which Exchange reports as "authenticated but not connected".
            return MailboxAccessError(
                f"IMAP refused the token of {self._signed_in_as} for the mailbox {self._address} (AUTHENTICATE "
                "failed): the delegate signed in, but the server does not let that account open this mailbox",
                remedy=f"give {self._signed_in_as} Full Access to {self._address} (Add-MailboxPermission "
                "-AccessRights FullAccess) or authorize the mailbox signed in as itself, then re-consent; also check "
                "that IMAP is enabled for the mailbox (Exchange admin center: mailbox > Email apps) and that the app "
                "has the delegated permission IMAP.AccessAsUser.All",
            )
        return MailboxAccessError(
            f"IMAP refused the OAuth login of {self._address} as {self._signed_in_as} (AUTHENTICATE failed)",
            remedy="check that IMAP is enabled for the mailbox (Exchange admin center: mailbox > Email apps), that "
            "the app has the delegated permission IMAP.AccessAsUser.All, and that the account signed in at consent "
            "is the mailbox or has Full Access to it",
        )

    def _translate(self, error: Exception) -> Exception:
        if isinstance(error, TransientError | MailboxAccessError):
            return error
        text = str(error)
        throttled = _throttle(text)
        if throttled:
            return throttled
        not_connected = self._not_connected(text)
        if not_connected:
            return not_connected
        if isinstance(error, socket.timeout | TimeoutError):
            return TransientError(f"IMAP server {self._host} stopped answering (timeout)")
        if isinstance(error, OSError | imap_errors.IMAPClientAbortError | EOFError):
            return TransientError(f"IMAP connection to {self._host} was lost: {type(error).__name__}")
        return TransientError(f"IMAP command failed on {self._host}: {type(error).__name__}: {text[:200]}")

    @property
    def tls_resumed(self) -> bool:
        """Whether the connection's TLS handshake resumed an earlier session with this server."""
        return self._client is not None and bool(self._client._imap.resumed)

    @property
    def client(self) -> IMAPClient:
        """The connection, for one command: FETCH answers still on the wire are read first."""
        self._settle()
        return self._connection()

    def _connection(self) -> IMAPClient:
        if self._client is None:
            raise TransientError("IMAP connection is closed")
        return self._client

    def select(self, folder: str, *, sizes_after: int | None = None) -> int:
        """Select ``folder`` read-write and return its UIDVALIDITY.

        With ``sizes_after``, the UID FETCH of ``new_sizes(sizes_after)`` goes out in the same write as SELECT
        (RFC 3501 5.5 allows it: SELECT's answer comes first), which saves one round trip per mailbox and run.
        """
        self._sizes_ahead = None
        try:
            imap = self.client._imap
            imap.untagged_responses = {}  # as imaplib's select(): only this folder's answers count
            commands = [b"SELECT " + _folder_argument(self.client, folder)]
            if sizes_after is not None:
                commands.append(_sizes_command(sizes_after))
            started = time.monotonic()
            tags = self._pipeline(commands)
            try:
                status, data = imap._command_complete("SELECT", tags[0])
                self.rtt = time.monotonic() - started
            except BaseException:
                self._drain(tags[1:])
                raise
            if status != "OK":
                self._drain(tags[1:])
                imap.state = "AUTH"
                raise imap_errors.IMAPClientError(f"select failed: {status} {data!r}"[:300])
            imap.state = "SELECTED"
            uidvalidity = int(imap.untagged_responses["UIDVALIDITY"][-1])
            if sizes_after is not None:
                self._sizes_ahead = (sizes_after, self._read_sizes(tags[1], sizes_after))
        except imap_errors.IMAPClientError as e:
            if isinstance(e, imap_errors.IMAPClientAbortError) or _throttle(str(e)) or self._not_connected(str(e)):
                raise self._translate(e) from e
            raise MailboxAccessError(
                f"cannot open folder {folder!r} of {self._address}: {str(e)[:200]}",
                remedy="create the folder or change the mailbox's folder option",
            ) from e
        except (TransientError, MailboxAccessError):
            raise
        except Exception as e:
            raise self._translate(e) from e
        return uidvalidity

    def new_sizes(self, last_uid: int) -> dict[int, int]:
        """Size of each message with a UID above ``last_uid``, ascending: one ``UID FETCH last+1:* (UID
        RFC822.SIZE)``, or none when ``select(sizes_after=last_uid)`` already asked."""
        ahead, self._sizes_ahead = self._sizes_ahead, None
        if ahead is not None and ahead[0] == last_uid:
            return ahead[1]
        try:
            (tag,) = self._pipeline([_sizes_command(last_uid)], settle=True)
            return self._read_sizes(tag, last_uid)
        except (TransientError, MailboxAccessError):
            raise
        except Exception as e:
            raise self._translate(e) from e

    def _pipeline(self, commands: list[bytes], *, settle: bool = False) -> list[bytes]:
        """Send tagged commands in one write (so neither Nagle nor a half-sent pipeline delays them); their tags."""
        imap = (self.client if settle else self._connection())._imap
        tags = [imap._new_tag() for _ in commands]
        imap.send(b"".join(tag + b" " + command + b"\r\n" for tag, command in zip(tags, commands, strict=True)))
        return tags

    def _drain(self, tags: list[bytes]) -> None:
        """Read the answers of pipelined commands whose results no longer matter (an earlier one failed)."""
        imap = self._connection()._imap
        for tag in tags:
            with contextlib.suppress(Exception):  # a NO, a BAD, or a server that has closed after its BYE
                imap._command_complete("FETCH", tag)

    def _read_sizes(self, tag: bytes, last_uid: int) -> dict[int, int]:
        imap = self._connection()._imap
        status, data = imap._command_complete("FETCH", tag)
        if status != "OK":
            raise imap_errors.IMAPClientError(f"UID FETCH failed: {status} {data!r}"[:300])
        _, data = imap._untagged_response(status, data, "FETCH")
        data = [] if data == [None] else data
        # "n:*" also matches the highest UID when it is below n; unsolicited FETCH answers carry no size.
        if all(isinstance(line, bytes) for line in data):
            # One line per message, "7 (UID 7 RFC822.SIZE 2048)" in any order: two searches each, where imapclient's
            # parser cost a quarter of the client's time for 2,000 small messages.
            found = {}
            for line in data:
                uid, size = _UID_ITEM.search(line), _SIZE_ITEM.search(line)
                if uid is not None and size is not None:
                    found[int(uid.group(1))] = int(size.group(1))
        else:  # a literal in some answer (an unsolicited item): the full parser
            answer = parse_fetch_response(data, False, True)
            found = {int(uid): int(item[b"RFC822.SIZE"]) for uid, item in answer.items() if b"RFC822.SIZE" in item}
        self._sizes.update(found)
        return {uid: found[uid] for uid in sorted(found) if uid > last_uid}

    def existing(self, uids: Iterable[int]) -> list[int]:
        """Which of ``uids`` are still in the selected folder (one UID SEARCH; none sent for no UIDs)."""
        wanted = sorted(set(uids))
        if not wanted:
            return []
        try:
            found = self.client.search(["UID", ",".join(map(str, wanted))])
        except Exception as e:
            raise self._translate(e) from e
        return sorted(int(u) for u in found if int(u) in wanted)

    def sizes(self, uids: Iterable[int]) -> dict[int, int]:
        """RFC822.SIZE of each UID that still exists."""
        return {uid: int(size) for uid, size in self._fetch_item(uids, b"RFC822.SIZE", b"RFC822.SIZE").items()}

    def fetch_headers(self, uids: Iterable[int]) -> dict[int, bytes]:
        """The header section of each message (BODY.PEEK[HEADER]: the \\Seen flag is untouched), for messages too
        large to collect whole."""
        return {uid: bytes(head) for uid, head in self._fetch_item(uids, b"BODY.PEEK[HEADER]", b"BODY[HEADER]").items()}

    def _fetch_item(self, uids: Iterable[int], item: bytes, answered_as: bytes) -> dict[int, Any]:
        """One FETCH data item of each UID that still exists; the server names ``item`` ``answered_as`` in its
        answer (a PEEK is answered without the .PEEK)."""
        wanted = list(uids)
        if not wanted:
            return {}
        try:
            answer = self.client.fetch(wanted, [item])
        except Exception as e:
            raise self._translate(e) from e
        return {int(uid): data[answered_as] for uid, data in answer.items() if answered_as in data}

    def fetch(self, uids: list[int]) -> dict[int, bytes]:
        """The exact bytes of each message (BODY.PEEK[], so the \\Seen flag is untouched).

        UIDs deleted meanwhile by someone else are simply absent from the answer.
        """
        self._settle()
        return self._answer(self._send_fetch(uids))

    def fetch_batches(
        self, batches: Iterable[list[int]], *, streamed: Collection[int] = (), sink: SinkFor | None = None
    ) -> Generator[tuple[list[int], dict[int, bytes]]]:
        """``(uids, fetch(uids))`` for each batch in order, with the next batches already requested up to the
        window (``window()`` bytes beyond the batch being read, and always the next one).

        A UID in ``streamed`` (alone in its batch) is never held whole: when its literal starts, ``sink(uid)`` is
        called once and gets the bytes in chunks of STREAM_CHUNK as they come off the socket, and the batch is
        yielded with the UID absent from the dict (absent from the sink's calls too when it was deleted meanwhile).
        Its FETCH is sent only once every earlier answer is read, and nothing is requested after it until its
        answer is read: so no other command (an after-action settling the wire) can read it whole, and every
        ``BODY[]`` literal on the wire then is that message's, wherever the server puts the UID.

        The caller may run other commands (after-actions) between batches: every other command first reads the
        answers still on the wire (imaplib files all untagged FETCH answers together, and ``UID STORE`` would
        otherwise take them). Leaving the loop early abandons the requested batches.
        """
        waiting = list(batches)
        streams = set(streamed)
        for batch in waiting:
            if len(batch) > 1 and streams.intersection(batch):
                raise ValueError("a streamed message must be alone in its batch")
        if streams and sink is None:
            raise ValueError("streamed messages need a sink")
        sent: list[bytes] = []
        try:
            window = self.window()
            while waiting or sent:
                while waiting and self._may_send(waiting[0], sent, streams, window):
                    sent.append(self._send_fetch(waiting.pop(0)))
                tag = sent.pop(0)
                uids = self._requested[tag]
                if uids[0] not in streams:
                    yield uids, self._answer(tag)
                    continue
                assert sink is not None
                self._streaming = (tag, uids[0], sink)
                try:
                    whole = self._answer(tag)
                finally:
                    self._streaming = None
                for uid, body in whole.items():  # a server that answered it early, before its turn: already whole
                    sink(uid).write(body)
                yield uids, {}
        finally:
            for tag in sent:
                for uid in self._requested.pop(tag, []):
                    self._bodies.pop(uid, None)

    def _may_send(self, batch: list[int], sent: list[bytes], streams: set[int], window: int) -> bool:
        if batch[0] in streams:
            return not sent  # its turn only: nothing else on the wire while it is read in chunks
        if any(self._requested[tag][0] in streams for tag in sent):
            return False  # nothing requested after a streamed message until it is read
        return len(sent) < 2 or self._requested_bytes(sent[1:]) < window

    def window(self) -> int:
        """Bytes to keep requested beyond the batch being read: the measured round trip at WINDOW_RATE."""
        return int(min(WINDOW_MAX, max(WINDOW_MIN, self.rtt * WINDOW_RATE)))

    def _requested_bytes(self, tags: list[bytes]) -> int:
        return sum(self._sizes.get(uid, GUESSED_SIZE) for tag in tags for uid in self._requested[tag])

    def _send_fetch(self, uids: list[int]) -> bytes:
        # imapclient's own fetch() sends and reads in one call; the pipelined path uses the same imaplib calls
        # that imapclient makes, split in two.
        try:
            tag: bytes = self._connection()._imap._command("UID", "FETCH", ",".join(map(str, uids)), "(BODY.PEEK[])")
        except Exception as e:
            raise self._translate(e) from e
        self._requested[tag] = uids
        self._in_flight.add(tag)
        return tag

    def _complete(self, tag: bytes) -> None:
        """Read up to ``tag``'s completion and keep the bodies that arrived meanwhile.

        A server may start the next command before it finishes this one (RFC 3501, 5.5), so the answers read here
        can hold bodies of a later FETCH too: they wait in ``_bodies`` for their own batch. The answers are read
        once, line by line, each body straight into its own bytes; nothing is parsed a second time.
        """
        self._in_flight.discard(tag)
        try:
            status, text = self._done.pop(tag) if tag in self._done else self._read_until(tag)
            if status != b"OK":
                raise imap_errors.IMAPClientError(f"FETCH failed: {status.decode()} {text!r}"[:300])
        except Exception as e:
            raise self._translate(e) from e

    def _read_until(self, tag: bytes) -> tuple[bytes, bytes]:
        imap = self._connection()._imap
        wanted = {uid for uids in self._requested.values() for uid in uids}
        bye = b""
        while True:
            line = imap.readline()
            if not line.endswith(b"\r\n"):
                raise imap_errors.IMAPClientAbortError(f"connection closed {bye.decode('ascii', 'replace')}".strip())
            if not line.startswith(b"* "):
                done, _, rest = line.partition(b" ")
                status, _, text = rest.rstrip(b"\r\n").partition(b" ")
                if done == tag:
                    return status, text
                if done in self._in_flight:
                    self._done[done] = (status, text)  # a later FETCH finished first; its caller reads this
                    continue
                raise imap_errors.IMAPClientAbortError(f"unexpected answer from the server: {line[:100]!r}")
            texts = [line]
            body: bytes | None = None
            streamed_to: int | None = None
            while (literal := _LITERAL_AT_END.search(line)) is not None:
                size = int(literal.group(1))
                is_body = line[: literal.start()].rstrip().upper().endswith(b"BODY[]")
                if is_body and self._streaming is not None and self._streaming[0] == tag:
                    announced = _UID_ITEM.search(b" ".join(texts))
                    if announced is None or int(announced.group(1)) == self._streaming[1]:
                        streamed_to = self._streaming[1]
                        self._read_streamed(imap, size, self._streaming[2](streamed_to))
                        line = imap.readline()
                        texts.append(line)
                        continue
                data = imap.read(size)
                if len(data) != size:
                    raise imap_errors.IMAPClientAbortError("connection closed in the middle of a message")
                if is_body:
                    body = data
                line = imap.readline()
                texts.append(line)
            if line.startswith(b"* BYE"):
                bye = line.rstrip(b"\r\n")
            uid = _UID_ITEM.search(b" ".join(texts))
            if streamed_to is not None and (uid is None or int(uid.group(1)) != streamed_to):
                # Only the streamed FETCH is on the wire, so this cannot be another batch's message: the server
                # answered with a body the command did not ask for. Its bytes went to the sink, which is abandoned.
                raise TransientError(
                    f"IMAP server {self._host} answered the FETCH of UID {streamed_to} with another message's body",
                    remedy="nothing to do: its bytes are not kept, and the next run fetches the message again",
                )
            # Unsolicited FETCH answers (flag changes by another client) carry no body, or a UID nobody asked for; a
            # message expunged by another client since the sizes were asked comes back as "BODY[] NIL".
            if body is not None and uid is not None and int(uid.group(1)) in wanted:
                self._bodies[int(uid.group(1))] = body

    @staticmethod
    def _read_streamed(imap: IMAP4_TLS, size: int, sink: ChunkSink) -> None:
        """Hand a literal of ``size`` bytes to ``sink`` in chunks as it comes; a cut raises before the last chunk."""
        remaining = size
        while remaining:
            data: bytes = imap.read(min(STREAM_CHUNK, remaining))
            if not data:
                raise imap_errors.IMAPClientAbortError("connection closed in the middle of a message")
            remaining -= len(data)
            sink.write(data)

    def _answer(self, tag: bytes) -> dict[int, bytes]:
        if tag in self._in_flight:
            self._complete(tag)
        uids = self._requested.pop(tag)
        return {uid: self._bodies.pop(uid) for uid in uids if uid in self._bodies}

    def _settle(self) -> None:
        """Read every FETCH completion still on the wire, so that the next command's answer is its own."""
        for tag in list(self._in_flight):
            self._complete(tag)

    def apply(self, step: Step) -> None:
        """Carry out one after-action step on messages that are already stored and queued."""
        if not step.uids:
            return
        uids = list(step.uids)
        try:
            if step.action is AfterAction.SEEN:
                self.client.add_flags(uids, [SEEN], silent=True)
            elif step.action is AfterAction.MOVE:
                self._move(uids, step.folder)
            elif step.action is AfterAction.DELETE:
                self._delete(uids)
            else:  # LEAVE is never a step (shared.after_action.plan)
                raise ValueError(f"not an after-action step: {step.action}")
        except MailboxAccessError as e:
            raise AfterActionError(str(e), remedy=e.remedy) from e
        except ValueError:
            raise
        except imap_errors.IMAPClientError as e:
            if isinstance(e, imap_errors.IMAPClientAbortError) or _throttle(str(e)) or self._not_connected(str(e)):
                raise self._translate(e) from e  # not the step's fault: the session cannot open the mailbox
            # A tagged NO or BAD: the server refuses this step (TRYCREATE, a permission); retrying will not help.
            raise AfterActionError(
                f"the server refused to {step.action.value} {len(uids)} message(s)"
                + (f" to {step.folder!r}" if step.folder else "")
                + f" in {self._address}: {str(e)[:200]}"
            ) from e
        except Exception as e:
            raise self._translate(e) from e

    def _move(self, uids: list[int], folder: str) -> None:
        self._ensure_folder(folder)
        client = self.client
        if client.has_capability("MOVE"):
            client.move(uids, folder)
        else:
            client.copy(uids, folder)
            self._delete(uids)

    def _delete(self, uids: list[int]) -> None:
        client = self.client
        client.delete_messages(uids, silent=True)
        if client.has_capability("UIDPLUS"):
            client.uid_expunge(uids)
        else:
            client.expunge()

    def _ensure_folder(self, name: str) -> None:
        if name in self._created:
            return
        if not self._folder_exists(name):
            try:
                self.client.create_folder(name)
            except imap_errors.IMAPClientError as e:
                if not self._folder_exists(name):  # a concurrent create is fine
                    raise MailboxAccessError(
                        f"cannot create folder {name!r} in {self._address}: {str(e)[:200]}",
                        remedy="create the folder by hand or choose another move_to folder",
                    ) from e
        self._created.add(name)

    def _folder_exists(self, name: str) -> bool:
        """An exact LIST of the quoted name. The options refuse the wildcards, and a server may still answer with
        other names (a case-folded INBOX, children): only the name itself counts."""
        listed = self.client.list_folders("", name)
        return any(
            str(found) == name or (name.upper() == "INBOX" and str(found).upper() == "INBOX") for _, _, found in listed
        )
