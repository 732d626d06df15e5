from __future__ import annotations

import io

import pytest
from imapclient import exceptions as imap_errors

import collectors.imap_session as imap_session_module
from collectors.imap_session import DEFAULT_THROTTLE_BACKOFF, WINDOW_MAX, WINDOW_MIN, ImapSession, _throttle
from shared.errors import MailboxAccessError, TransientError


def test_exchange_throttling_answer_gives_its_backoff() -> None:
    error = _throttle("b'Request is throttled. Suggested Backoff Time: 2470 milliseconds'")
    assert isinstance(error, TransientError) and error.retry_after == 2.47


def test_throttling_without_a_figure_uses_the_default() -> None:
    error = _throttle("BAD User is throttled")
    assert error is not None and error.retry_after == DEFAULT_THROTTLE_BACKOFF


def test_other_answers_are_not_throttling() -> None:
    assert _throttle("NO AUTHENTICATE failed.") is None


def session() -> ImapSession:
    return ImapSession(
        "imap.example", 993, address="shared@contoso.com", access_token="x", signed_in_as="d@contoso.com"
    )


def test_not_connected_is_explained_as_an_access_problem() -> None:
    error = session()._login_error("User is authenticated but not connected.")
    assert isinstance(error, MailboxAccessError)
    assert "Full Access" in error.remedy and "d@contoso.com" in str(error)


def test_authenticate_failed_names_the_usual_causes() -> None:
    error = session()._login_error("AUTHENTICATE failed.")
    assert isinstance(error, MailboxAccessError)
    assert "IMAP is enabled" in error.remedy and "IMAP.AccessAsUser.All" in error.remedy


def test_an_app_token_refused_at_login_gets_the_modes_own_remedy_even_when_throttling_is_not_the_cause() -> None:
    own = MailboxAccessError("refused for the app", remedy="Add-MailboxPermission ...")
    app = ImapSession("imap.example", 993, address="shared@contoso.com", access_token="x", refused=lambda: own)
    assert app._login_error("AUTHENTICATE failed.") is own
    assert app._login_error("User is authenticated but not connected.") is own
    throttled = app._login_error("Request is throttled. Suggested Backoff Time: 100 milliseconds")
    assert isinstance(throttled, TransientError), "throttling stays transient in app mode"


class Scripted:
    """imaplib's side of a connection whose server answers each command from a script, in the order sent: what
    a server does with a pipeline. ``drained`` lists the commands whose answers were read."""

    def __init__(self, **answers: tuple[str, list[bytes], dict[str, list[bytes]]] | Exception) -> None:
        self.answers = answers  # by the command's first word: (status, data, untagged answers) or an error raised
        self.writes: list[bytes] = []
        self.drained: list[str] = []
        self.untagged_responses: dict[str, list[bytes]] = {}
        self.state = "AUTH"
        self._tags = 0
        self._commands: dict[bytes, str] = {}

    def _new_tag(self) -> bytes:
        self._tags += 1
        return b"T%d" % self._tags

    def send(self, data: bytes) -> None:
        self.writes.append(data)
        for line in data.split(b"\r\n"):
            if line:
                tag, _, command = line.partition(b" ")
                self._commands[tag] = command.decode()

    def _command_complete(self, name: str, tag: bytes) -> tuple[str, list[bytes]]:
        command = self._commands.pop(tag)
        self.drained.append(command)
        answer = self.answers[command.split()[0] if not command.startswith("UID ") else "FETCH"]
        if isinstance(answer, Exception):
            raise answer
        status, data, untagged = answer
        for key, values in untagged.items():
            self.untagged_responses.setdefault(key, []).extend(values)
        return status, data

    def _untagged_response(self, status: str, data: list[bytes], name: str) -> tuple[str, list[bytes | None]]:
        return status, list(self.untagged_responses.pop(name, [None]))


class ScriptedClient:
    def __init__(self, imap: Scripted) -> None:
        self._imap = imap

    def _normalise_folder(self, folder: str) -> bytes:
        return b'"' + folder.encode() + b'"'


def over(session: ImapSession, imap: Scripted) -> ImapSession:
    session._client = ScriptedClient(imap)  # type: ignore[assignment]
    return session


NOT_CONNECTED = imap_errors.IMAPClientError("SELECT command error: BAD [b'User is authenticated but not connected.']")


def test_an_app_token_refused_at_select_gets_the_modes_own_remedy() -> None:
    own = MailboxAccessError("refused for the app", remedy="Add-MailboxPermission ...")
    app = ImapSession("imap.example", 993, address="shared@contoso.com", access_token="x", refused=lambda: own)
    imap = Scripted(SELECT=NOT_CONNECTED, FETCH=NOT_CONNECTED)
    with pytest.raises(MailboxAccessError) as refused:
        over(app, imap).select("INBOX", sizes_after=0)
    assert refused.value is own
    assert imap.drained == ['SELECT "INBOX"', "UID FETCH 1:* (UID RFC822.SIZE)"], "the pipelined answer is read"

    with pytest.raises(MailboxAccessError) as folder:
        over(session(), Scripted(SELECT=NOT_CONNECTED)).select("INBOX")
    assert "not connected" in str(folder.value) and "Full Access" in folder.value.remedy, "delegated mode's remedy"
    assert "create the folder" not in folder.value.remedy


def test_not_connected_is_an_access_problem_whichever_command_gets_it() -> None:
    from imapclient.exceptions import IMAPClientError

    for command in ("SELECT", "NAMESPACE", "LIST", "UID SEARCH"):
        error = session()._translate(
            IMAPClientError(f"{command} command error: BAD [b'User is authenticated but not connected.']")
        )
        assert isinstance(error, MailboxAccessError), command
        assert "Full Access" in error.remedy and "delegate=" in error.remedy


def test_a_no_to_select_in_a_pipeline_reads_the_next_answer_and_names_the_folder() -> None:
    imap = Scripted(
        SELECT=("NO", [b"Mailbox doesn't exist: Archive"], {}),
        FETCH=imap_errors.IMAPClientError("FETCH command error: BAD [b'No mailbox selected']"),
    )
    with pytest.raises(MailboxAccessError) as missing:
        over(session(), imap).select("Archive", sizes_after=7)
    assert "cannot open folder 'Archive'" in str(missing.value) and "create the folder" in missing.value.remedy
    assert imap.writes == [b'T1 SELECT "Archive"\r\nT2 UID FETCH 8:* (UID RFC822.SIZE)\r\n'], "one write"
    assert len(imap.drained) == 2 and imap.state == "AUTH"


def test_throttling_in_the_middle_of_a_pipeline_is_transient() -> None:
    throttled = imap_errors.IMAPClientError(
        "FETCH command error: BAD [b'Request is throttled. Suggested Backoff Time: 1500 milliseconds']"
    )
    imap = Scripted(SELECT=("OK", [b"[READ-WRITE] done"], {"UIDVALIDITY": [b"9"]}), FETCH=throttled)
    with pytest.raises(TransientError) as error:
        over(session(), imap).select("INBOX", sizes_after=0)
    assert error.value.retry_after == 1.5


def test_new_sizes_come_with_select_and_leave_out_the_last_message_below_the_checkpoint() -> None:
    selected = ("OK", [b"[READ-WRITE] done"], {"UIDVALIDITY": [b"9"]})
    # "UID FETCH 8:*" when the highest UID is 7: the server answers with message 7 (RFC 3501 6.4.8).
    imap = Scripted(SELECT=selected, FETCH=("OK", [b"done"], {"FETCH": [b"3 (UID 7 RFC822.SIZE 120)"]}))
    imap_session = over(session(), imap)
    assert imap_session.select("INBOX", sizes_after=7) == 9
    assert imap_session.new_sizes(7) == {}
    assert len(imap.writes) == 1, "the sizes came with SELECT's answer"

    newer = {"FETCH": [b"4 (UID 9 RFC822.SIZE 20)", b"3 (UID 8 RFC822.SIZE 10)", b"2 (FLAGS (\\Seen))"]}
    imap.answers["FETCH"] = ("OK", [b"done"], newer)
    assert imap_session.new_sizes(7) == {8: 10, 9: 20}, "a second call asks the server again"
    assert len(imap.writes) == 2


def test_new_sizes_read_items_in_any_order_and_answers_with_a_literal() -> None:
    selected = ("OK", [b"[READ-WRITE] done"], {"UIDVALIDITY": [b"9"]})
    lines = [b"1 (RFC822.SIZE 30 UID 10)", b"2 (uid 11 rfc822.size 40 FLAGS (\\Seen))"]
    imap = Scripted(SELECT=selected, FETCH=("OK", [b"done"], {"FETCH": lines}))
    assert over(session(), imap).new_sizes(9) == {10: 30, 11: 40}

    # An unsolicited answer with a literal (imaplib gives it as a tuple) goes through imapclient's full parser.
    with_literal = [(b"3 (UID 12 RFC822.SIZE 50 X-NOTE {2}", b"hi"), b")", b"4 (UID 13 RFC822.SIZE 60)"]
    imap = Scripted(SELECT=selected, FETCH=("OK", [b"done"], {"FETCH": with_literal}))
    assert over(session(), imap).new_sizes(11) == {12: 50, 13: 60}


class Wire:
    """The reading side of imaplib over a scripted byte stream: what the FETCH reader sees of a server."""

    def __init__(self, data: bytes) -> None:
        self.stream = io.BytesIO(data)
        self.sent: list[bytes] = []
        self.tagged_commands: dict[bytes, object] = {}
        self._tags = 0

    def readline(self) -> bytes:
        return self.stream.readline()

    def read(self, size: int) -> bytes:
        return self.stream.read(size)

    def _new_tag(self) -> bytes:
        self._tags += 1
        return b"T%d" % self._tags

    def _command(self, *words: str) -> bytes:
        self.sent.append(" ".join(words).encode())
        return self._new_tag()


def reading(data: bytes) -> ImapSession:
    imap_session = session()
    imap_session._client = ScriptedClient(Wire(data))  # type: ignore[arg-type, assignment]
    return imap_session


def test_the_fetch_reader_takes_bodies_whatever_the_order_of_the_items() -> None:
    first, second = b"Subject: a\r\n\r\nUID 99 in a body\r\n", b"Subject: b\r\n\r\n{5}\r\n"
    answer = (
        b"* 1 FETCH (UID 7 BODY[] {%d}\r\n%s)\r\n" % (len(first), first)
        + b"* 2 FETCH (BODY[] {%d}\r\n%s UID 8 FLAGS (\\Seen))\r\n" % (len(second), second)  # Exchange's order
        + b"* 3 FETCH (UID 9 BODY[] NIL)\r\n"  # expunged meanwhile by another client
        + b"* 4 FETCH (FLAGS (\\Seen) UID 12)\r\n"  # a flag change nobody asked about
        + b"* 5 EXISTS\r\n"
        + b"T1 OK FETCH completed.\r\n"
    )
    assert reading(answer).fetch([7, 8, 9]) == {7: first, 8: second}


def test_a_later_fetch_finished_first_is_kept_for_its_own_batch() -> None:
    answer = b"* 1 FETCH (UID 7 BODY[] {1}\r\na)\r\nT2 OK done\r\n* 2 FETCH (UID 8 BODY[] {1}\r\nb)\r\nT1 OK done\r\n"
    imap_session = reading(answer)
    assert list(imap_session.fetch_batches([[8], [7]])) == [([8], {8: b"b"}), ([7], {7: b"a"})]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"* 1 FETCH (UID 7 BODY[] {100}\r\nshort", "lost"),
        (
            b"T1 BAD Request is throttled. Suggested Backoff Time: 900 milliseconds\r\n* BYE Connection closed.\r\n",
            "throttling",
        ),
        (b"T1 NO [UNAVAILABLE] Internal error\r\n", "FETCH failed"),
        (b"* BYE Connection closed. 14\r\n", "lost"),
    ],
    ids=["cut-in-a-body", "throttled", "no", "bye"],
)
def test_the_fetch_reader_turns_a_broken_answer_into_a_transient_error(answer: bytes, error: str) -> None:
    with pytest.raises(TransientError) as failed:
        reading(answer).fetch([7])
    assert error in str(failed.value)


def test_the_window_follows_the_round_trip_and_counts_bytes_not_batches() -> None:
    imap_session = reading(b"")
    imap_session.rtt = 0.02
    assert imap_session.window() == WINDOW_MIN
    imap_session.rtt = 0.08
    assert WINDOW_MIN < imap_session.window() <= WINDOW_MAX
    imap_session.rtt = 5.0
    assert imap_session.window() == WINDOW_MAX

    imap_session._sizes = {uid: 3 * 1024 * 1024 for uid in range(1, 11)}  # ten 3 MB messages, one per batch
    batches = iter(imap_session.fetch_batches([[uid] for uid in range(1, 11)]))
    with pytest.raises(TransientError):
        next(batches)  # the scripted server has nothing to say; what counts is what was requested before reading
    sent = imap_session._connection()._imap.sent
    assert len(sent) == 2 + imap_session.window() // (3 * 1024 * 1024), sent


class Chunks:
    """A sink that keeps the chunks it got, per UID."""

    def __init__(self) -> None:
        self.got: dict[int, list[bytes]] = {}

    def __call__(self, uid: int) -> Chunks:
        assert uid not in self.got, "one sink call per message"
        self.got[uid] = []
        self.uid = uid
        return self

    def write(self, chunk: bytes) -> None:
        self.got[self.uid].append(chunk)


@pytest.mark.parametrize("uid_after", [False, True], ids=["uid-first", "uid-after-the-body"])
def test_a_streamed_message_reaches_the_sink_in_chunks_and_nothing_is_sent_after_it(
    monkeypatch: pytest.MonkeyPatch, uid_after: bool
) -> None:
    monkeypatch.setattr(imap_session_module, "STREAM_CHUNK", 4)
    small, big = b"Subject: s\r\n\r\nhi\r\n", b"Subject: b\r\n\r\n" + b"0123456789" * 3
    literal = b"BODY[] {%d}\r\n%s" % (len(big), big)
    items = literal + b" UID 8)" if uid_after else b"UID 8 " + literal + b")"
    answer = (
        b"* 1 FETCH (UID 7 BODY[] {%d}\r\n%s)\r\nT1 OK done\r\n" % (len(small), small)
        + b"* 2 FETCH (" + items + b"\r\nT2 OK done\r\n"
        + b"* 3 FETCH (UID 9 BODY[] {2}\r\nok)\r\nT3 OK done\r\n"
    )  # fmt: skip
    imap_session = reading(answer)
    imap_session._sizes = {7: len(small), 8: len(big), 9: 2}
    sink = Chunks()
    batches = imap_session.fetch_batches([[7], [8], [9]], streamed={8}, sink=sink)
    sent = imap_session._connection()._imap.sent

    assert next(batches) == ([7], {7: small})
    assert len(sent) == 1, "the streamed FETCH waits until every earlier answer is read"
    assert next(batches) == ([8], {})
    assert b"".join(sink.got[8]) == big and max(map(len, sink.got[8])) == 4
    assert len(sent) == 2, "nothing is requested while a streamed message is on the wire"
    assert next(batches) == ([9], {9: b"ok"})


def test_a_streamed_message_cut_in_its_bytes_raises_after_handing_over_only_part() -> None:
    answer = b"* 2 FETCH (UID 8 BODY[] {100}\r\n" + b"x" * 40
    imap_session = reading(answer)
    sink = Chunks()
    with pytest.raises(TransientError, match="lost"):
        list(imap_session.fetch_batches([[8]], streamed={8}, sink=sink))
    assert len(b"".join(sink.got[8])) == 40


def test_a_body_of_another_uid_in_a_streamed_answer_is_refused() -> None:
    answer = b"* 2 FETCH (BODY[] {3}\r\nabc UID 9)\r\nT1 OK done\r\n"
    with pytest.raises(TransientError, match="of UID 8 with another message"):
        list(reading(answer).fetch_batches([[8]], streamed={8}, sink=Chunks()))


def test_a_streamed_message_must_be_alone_in_its_batch() -> None:
    with pytest.raises(ValueError, match="alone"):
        list(reading(b"").fetch_batches([[7, 8]], streamed={8}, sink=Chunks()))
