"""Benchmark 6d against the old path, the empty run at 20 ms RTT against the path before the wire work: one
``Collector.run`` over 500 mailboxes with no new mail, IMAP through the latency proxy, for the current code and for
the commit before the wire work (``BASELINE``), in the same run.

The baseline's code is taken from git (``git archive``) into a temporary folder, removed afterwards. Each side runs
in a process of its own on its own tree, with the same stack (Azurite, Dovecot, the Entra stand-in, this run's Key
Vault endpoint) and the same proxy, and is driven by the same script (``bench/empty_side.py``, copied into the old
tree), so both do exactly the same thing. Each side sets up its mailboxes as shared mailboxes of one account
authorized through the real consent flow (a consent of its own for each would take about a second per mailbox on
these machines, and at 500 the old tree's set-up used to die on the stand-in dropping a reused connection); in the
timed runs every mailbox still costs what a consented one does: a token from the worker's warm cache, a lease, an
IMAP login (as the owner, ``user=`` the mailbox), SELECT, the registry.

Both sides run the empty run twice to warm (tokens read from Key Vault, the first success written), then the timed
runs alternate, old-new then new-old, so that a change of load weighs on both. The ratio is the median of the new
side over the median of the old one. A mailbox that fails in any run, on either side, stops the benchmark: no
ratio is reported over runs that did not do the whole work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.common import ROOT, Row, median, say
from bench.empty_side import ANSWER, addresses
from bench.latency_proxy import LatencyProxy

BASELINE = "03e5b7d"  # the commit before the wire work
GOAL = 0.5  # the new side's median over the old side's, at most
RTT_MS = 20
WARM_RUNS = 2
WARM_RETRIES = 2  # more warm-up runs a side may take to end with a whole one (see _warm)
SIDES = ("old", "new")


class MailboxFailed(RuntimeError):
    """A mailbox did not end ``ok`` with nothing collected: the run did not do the whole work, no ratio is taken."""


class SideFailed(RuntimeError):
    """A side's command raised: its process reports it and its traceback is in its log."""


def check_run(side: str, label: str, answer: dict[str, Any], expected: int) -> float:
    """The seconds of one side's run; MailboxFailed when a mailbox failed or went missing, SideFailed when the run
    itself raised."""
    if "error" in answer:
        raise SideFailed(f"{side} side, {label}: {answer['error']} (see the side's log)")
    failures = int(answer["failures"])
    if failures or int(answer["mailboxes"]) != expected:
        raise MailboxFailed(
            f"{side} side, {label}: {failures} of {answer['mailboxes']} mailboxes failed (expected {expected} "
            f"mailboxes, all ok and empty); first: {'; '.join(answer['failed']) or '-'}"
        )
    return float(answer["seconds"])


def order(rounds: int) -> list[str]:
    """The sides' turns: old, new, then new, old, and so on (each side starts half of the rounds)."""
    turns: list[str] = []
    for i in range(rounds):
        turns += list(SIDES) if i % 2 == 0 else list(reversed(SIDES))
    return turns


def summarize(mailboxes: int, times: dict[str, list[float]], loads: list[str], setup: str) -> Row:
    """The row: the medians, each side's spread, and the ratio new / old against the goal."""
    new, old = times["new"], times["old"]
    if not new or not old:
        raise ValueError("both sides need at least one timed run")
    ratio = median(new) / median(old)

    def spread(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    return Row(
        f"6d empty run, {mailboxes} mailboxes, {RTT_MS} ms RTT, against {BASELINE}",
        f"{median(new):.2f} s, median of {spread(new)} ({median(new) / mailboxes * 1000:.0f} ms per mailbox)",
        f"{median(old):.2f} s before the wire work, median of {spread(old)} "
        f"({median(old) / mailboxes * 1000:.0f} ms per mailbox)",
        ratio,
        f"<= {GOAL}x",
        ratio <= GOAL,
        f"ratio {ratio:.3f} (round by round {spread([n / o for n, o in zip(new, old, strict=False)])}); "
        f"one Collector.run per side and round, one worker each, alternating "
        f"({', '.join(order(1))} then the reverse), after {WARM_RUNS} warm-up runs; spread max/min: "
        f"new {max(new) / min(new):.2f}x, old {max(old) / min(old):.2f}x; {setup}; "
        f"load average (1/5/15 min) {', then '.join(loads)}",
    )


@dataclass
class _Process:
    name: str
    process: subprocess.Popen[str]
    log: Path
    answers: IO[str] = field(init=False)

    def __post_init__(self) -> None:
        assert self.process.stdout is not None
        self.answers = self.process.stdout

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # reported below with the log's end
        for line in self.answers:
            if line.startswith(ANSWER):
                answer: dict[str, Any] = json.loads(line[len(ANSWER) :])
                return answer
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        raise RuntimeError(f"{self.name} side ended (exit code {self.process.wait()}) during {command!r}:\n{tail}")


def _baseline_tree(folder: Path) -> Path:
    """The baseline commit's files, from git, with the side script of this tree added."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", BASELINE], check=True, capture_output=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        raise RuntimeError(
            f"cannot take commit {BASELINE} from git ({detail.decode(errors='replace').strip() or e}); run the "
            "benchmark in a git clone that holds the history (git fetch --unshallow in a shallow one)"
        ) from e
    tree = folder / "baseline"
    tree.mkdir()
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(tree, filter="data")
    shutil.copy2(ROOT / "bench" / "empty_side.py", tree / "bench" / "empty_side.py")
    return tree


@contextlib.contextmanager
def _side(
    name: str, code: Path, info_file: Path, tag: str, mailboxes: int, port: int, folder: Path
) -> Iterator[_Process]:
    log = folder / f"{name}.log"
    command = [sys.executable, "-m", "bench.empty_side", "--info", str(info_file), "--tag", tag]
    command += ["--mailboxes", str(mailboxes), "--imap-port", str(port)]
    with log.open("w") as err:
        process = subprocess.Popen(
            command,
            cwd=code,
            env={**os.environ, "PYTHONPATH": str(code)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    side = _Process(name, process, log)
    try:
        yield side
    finally:
        if process.poll() is None:
            try:
                closed = side.ask("close")
                if closed.get("left"):
                    say(f"empty before wire: {name} side cleanup left {closed['left']}")
                process.wait(timeout=60)
            except Exception as e:  # cleanup goes on
                say(f"empty before wire: {name} side did not close: {type(e).__name__}")
            if process.poll() is None:
                process.kill()
                process.wait()


def _warm(name: str, side: _Process, mailboxes: int) -> None:
    """``WARM_RUNS`` runs, the last of them whole. The old tree's registry writes are not retried when Azurite drops
    a kept-alive connection (fixed since), so a warm-up may fail a mailbox on a loaded machine; such a mailbox would
    still owe its failure's bookkeeping in the first timed run, hence up to ``WARM_RETRIES`` more warm-ups."""
    last = WARM_RUNS + WARM_RETRIES
    for attempt in range(1, last + 1):
        try:
            seconds = check_run(name, f"warm-up {attempt}", side.ask("run"), mailboxes)
        except MailboxFailed as e:
            if attempt == last:
                raise
            say(f"empty before wire: {e}; one more warm-up")
            continue
        say(f"empty before wire: {name} warm-up {attempt} in {seconds:.1f} s")
        if attempt >= WARM_RUNS:
            return


def _load() -> str:
    return "/".join(f"{n:.1f}" for n in os.getloadavg())


def run(info: dict[str, Any], *, mailboxes: int = 500, rounds: int = 3) -> list[Row]:
    from devstack.dovecot import grant_full_access_to_all

    if mailboxes < 2 or rounds < 1:
        raise ValueError("the benchmark needs at least 2 mailboxes (an owner and a shared one) and 1 round")
    folder = Path(tempfile.mkdtemp(prefix="bench-empty-before-"))
    dovecot = Path(info["dovecot_config"])
    tags = {name: f"b{os.urandom(4).hex()}" for name in SIDES}
    lists = {name: addresses(tags[name], mailboxes) for name in SIDES}
    granted: list[str] = []
    loads = [_load()]
    try:
        trees = {"old": _baseline_tree(folder), "new": ROOT}
        info_file = folder / "stack.json"
        info_file.write_text(json.dumps(info))
        info_file.chmod(0o600)
        for name in SIDES:
            grant_full_access_to_all(dovecot, lists[name][0], lists[name][1:])
            granted.append(name)
        with contextlib.ExitStack() as stack:
            port = stack.enter_context(LatencyProxy(info["ports"]["imaps"], delay_ms=RTT_MS / 2))
            sides = {
                name: stack.enter_context(_side(name, trees[name], info_file, tags[name], mailboxes, port, folder))
                for name in SIDES
            }
            setups = []
            for name in SIDES:
                answer = sides[name].ask("setup")
                if "error" in answer:
                    raise RuntimeError(f"{name} side's set-up failed: {answer['error']}")
                setups.append(f"{name} {answer['seconds']:.0f} s")
            say(f"empty before wire: {mailboxes} mailboxes a side set up ({', '.join(setups)}; load {_load()})")
            for name in SIDES:
                _warm(name, sides[name], mailboxes)
            loads.append(_load())
            times: dict[str, list[float]] = {name: [] for name in SIDES}
            for turn, name in enumerate(order(rounds)):
                seconds = check_run(name, f"timed run {turn // 2 + 1}", sides[name].ask("run"), mailboxes)
                times[name].append(seconds)
                say(f"empty before wire: {name} {seconds:.2f} s (load {_load()})")
            loads.append(_load())
    finally:
        for name in granted:
            grant_full_access_to_all(dovecot, lists[name][0], lists[name][1:], revoke=True)
        mail_root = dovecot.parent / "mail"
        for tag in tags.values():
            for home in mail_root.glob(f"{tag}-*"):
                shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    setup = f"mailboxes set up as 1 real consent and {mailboxes - 1} shared mailboxes of it per side"
    row = summarize(mailboxes, times, loads, setup)
    say(f"empty before wire: new {median(times['new']):.2f} s, old {median(times['old']):.2f} s, {row.ratio:.3f}x")
    return [row]
