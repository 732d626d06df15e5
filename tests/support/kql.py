"""Evaluate the log-alert queries of infra/app/alerts.bicep against log lines, for the subset of Kusto they use.

Kusto matches ``has`` on whole terms, and a term is a maximal run of letters and digits: ``needs_reconsent`` is two
terms and ``outcome=needs_reconsent`` three. A ``has`` whose right side is not a single term is refused here, so the
queries read their fields with ``parse`` or ``extract``, whose meaning does not depend on the term index.
Supported: ``traces``; ``where`` with ``has``, ``==``, ``!=``, ``>=``, ``isnotnull()``, ``isnotempty()`` and
``and``; ``extend c = toint|tostring(extract(@"re", n, message))``; ``parse message with`` (kind simple);
``project``. Anything else raises, so a query the evaluator does not understand cannot pass by accident.
(Kusto documentation: "String operators", "parse operator", "extract()".)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Row = dict[str, Any]

_TERM = re.compile(r"^[A-Za-z0-9]+$")
_STRING = r'(?:@"(?:[^"]|"")*"|"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')'


class UnsupportedQuery(ValueError):
    """The query uses Kusto this evaluator does not model."""


def alert_queries(bicep: Path) -> dict[str, str]:
    """The ``var <name>Query = '''...'''`` blocks of a Bicep file, by variable name."""
    return dict(re.findall(r"var (\w+Query) = '''(.*?)'''", bicep.read_text(), re.S))


def _literal(token: str) -> str:
    if token.startswith('@"'):
        return token[2:-1].replace('""', '"')
    body = token[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def has(text: str, term: str) -> bool:
    """Kusto ``has`` for a single term: a whole run of letters and digits, case-insensitive."""
    if not _TERM.match(term):
        raise UnsupportedQuery(
            f"has {term!r}: not one term (Kusto splits terms at every character that is not a letter or digit); "
            "use parse or extract"
        )
    return term.lower() in (t.lower() for t in re.findall(r"[A-Za-z0-9]+", text))


def _condition(row: Row, text: str) -> bool:
    parts = re.split(r"\s+and\s+", text.strip())
    return all(_single(row, part.strip()) for part in parts)


def _single(row: Row, text: str) -> bool:
    if m := re.fullmatch(rf"(\w+) has ({_STRING})", text):
        return has(str(row.get(m[1]) or ""), _literal(m[2]))
    if m := re.fullmatch(r"isnotnull\((\w+)\)", text):
        return row.get(m[1]) is not None
    if m := re.fullmatch(r"isnotempty\((\w+)\)", text):
        return row.get(m[1]) not in (None, "")
    if m := re.fullmatch(rf"(\w+) (==|!=) ({_STRING})", text):
        equal = str(row.get(m[1])) == _literal(m[3]) if row.get(m[1]) is not None else False
        return equal if m[2] == "==" else not equal
    if m := re.fullmatch(r"(\w+) (>=|<=|>|<) (-?\d+)", text):
        value = row.get(m[1])
        if value is None:
            return False
        limit = int(m[3])
        return bool({">=": value >= limit, "<=": value <= limit, ">": value > limit, "<": value < limit}[m[2]])
    raise UnsupportedQuery(f"where {text!r}")


def _extend(row: Row, text: str) -> None:
    m = re.fullmatch(rf"(\w+) = (toint|tostring)\(extract\(({_STRING}), (\d+), (\w+)\)\)", text.strip())
    if not m:
        raise UnsupportedQuery(f"extend {text!r}")
    found = re.search(_literal(m[3]), str(row.get(m[5]) or ""))
    value = found.group(int(m[4])) if found else None
    if m[2] == "toint":
        row[m[1]] = int(value) if value is not None and re.fullmatch(r"-?\d+", value) else None
    else:
        row[m[1]] = value if value is not None else ""


def _parse(row: Row, text: str) -> None:
    """``parse <column> with`` of kind simple: constants match as they are and must all appear; each column takes
    the shortest text up to the next constant (the last one, the rest). A row that does not match keeps empty
    columns, as Kusto's parse keeps the row."""
    m = re.fullmatch(r"(\w+) with (.*)", text.strip(), re.S)
    if not m:
        raise UnsupportedQuery(f"parse {text!r}")
    source, spec = m[1], m[2].strip()
    items = re.findall(rf"{_STRING}|\*|\w+(?::\w+)?", spec)
    if "".join(items).replace(" ", "") != re.sub(r"\s+", "", spec):
        raise UnsupportedQuery(f"parse pattern {spec!r}")
    pattern, columns = "", []
    for index, item in enumerate(items):
        last = index == len(items) - 1
        if item == "*":
            pattern += ".*" if last else ".*?"
        elif item[0] in "\"'@":
            pattern += re.escape(_literal(item))
        else:
            name, _, kind = item.partition(":")
            if kind not in ("", "string", "int", "long"):
                raise UnsupportedQuery(f"parse column type {kind!r}")
            columns.append((name, kind))
            pattern += "(.*)" if last else "(.*?)"
    found = re.match(pattern + "$", str(row.get(source) or ""), re.S)
    for position, (name, kind) in enumerate(columns, start=1):
        value = found.group(position) if found else None
        if kind in ("int", "long"):
            row[name] = int(value) if value is not None and re.fullmatch(r"-?\d+", value) else None
        else:
            row[name] = value if value is not None else ""


def run(query: str, traces: Iterable[Row]) -> list[Row]:
    """Rows that ``query`` returns over ``traces`` (each row at least ``timestamp`` and ``message``)."""
    lines = [line.strip() for line in query.strip().splitlines() if line.strip() and not line.strip().startswith("//")]
    if not lines or lines[0] != "traces":
        raise UnsupportedQuery("the query must start with traces")
    rows = [dict(row) for row in traces]
    for line in lines[1:]:
        m = re.fullmatch(r"\|\s*(\w+)\s+(.*)", line, re.S)
        if not m:
            raise UnsupportedQuery(line)
        verb, rest = m[1], m[2]
        if verb == "where":
            rows = [row for row in rows if _condition(row, rest)]
        elif verb == "extend":
            for row in rows:
                _extend(row, rest)
        elif verb == "parse":
            for row in rows:
                _parse(row, rest)
        elif verb == "project":
            names = [name.strip() for name in rest.split(",")]
            rows = [{name: row.get(name) for name in names} for row in rows]
        else:
            raise UnsupportedQuery(f"operator {verb!r}")
    return rows


def traces_from_log(text: str) -> list[Row]:
    """Rows of Application Insights' ``traces`` from the local host's log: the formatted message of each record
    (``<date> <time> <LEVEL> <logger> <message>``); continuation lines (tracebacks) are left out."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+) (.*)", line)
        if m:
            rows.append({"timestamp": m[1], "severityLevel": m[2], "category": m[3], "message": m[4]})
    return rows
