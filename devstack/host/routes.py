"""Route templates as the Functions host matches them, and the route prefix."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote

from devstack.host.errors import HostError

_PARAMETER = re.compile(r"\{(?P<body>[^{}]+)\}")
_PARAMETER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NUMBER = r"-?\d+(?:\.\d+)?"
_ROUTE_CONSTRAINTS = {
    "int": r"-?\d+",
    "long": r"-?\d+",
    "decimal": _NUMBER,
    "double": _NUMBER,
    "float": _NUMBER,
    "alpha": r"[A-Za-z]+",
    "bool": r"true|false",
    "guid": r"[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}",
}


@dataclass(frozen=True)
class _Segment:
    pattern: re.Pattern[str] | None
    names: tuple[str, ...]
    optional: bool = False
    catch_all: str | None = None
    constrained: int = 0

    @property
    def literal(self) -> bool:
        return not self.names and self.catch_all is None


class RouteTemplate:
    """An ASP.NET-style route template as the Functions host matches it: literal segments (case-insensitive),
    ``{name}``, ``{name:int}`` and the other simple constraints, trailing ``{name?}``, and a final ``{*rest}``.
    """

    def __init__(self, template: str) -> None:
        """Compile the template; raises HostError naming what the template gets wrong."""
        self.template = template.strip("/")
        self._segments = tuple(self._compile(self.template))

    def __repr__(self) -> str:
        return f"RouteTemplate({self.template!r})"

    def _compile(self, template: str) -> Iterator[_Segment]:
        seen: set[str] = set()
        texts = template.split("/") if template else []
        seen_optional = False
        for index, text in enumerate(texts):
            segment = self._compile_segment(text)
            names = (*segment.names, *((segment.catch_all,) if segment.catch_all else ()))
            for name in names:
                if name.lower() in seen:
                    raise HostError(f"route {template!r} names the parameter {name!r} twice")
                seen.add(name.lower())
            if segment.catch_all is not None and index != len(texts) - 1:
                raise HostError(f"route {template!r}: a catch-all parameter must be the last segment")
            if seen_optional and not segment.optional and segment.catch_all is None:
                raise HostError(f"route {template!r}: only trailing parameters can be optional")
            seen_optional = seen_optional or segment.optional
            yield segment

    @staticmethod
    def _compile_segment(text: str) -> _Segment:
        if not text:
            raise HostError("a route must not contain an empty segment (//)")
        catch_all = re.fullmatch(r"\{\*{1,2}(?P<name>[^{}:?*]+)\}", text)
        if catch_all:
            name = catch_all.group("name")
            if not _PARAMETER_NAME.match(name):
                raise HostError(f"route parameter name {name!r} is not an identifier")
            return _Segment(pattern=None, names=(), catch_all=name)
        regex: list[str] = []
        names: list[str] = []
        optional = False
        constrained = 0
        position = 0
        for match in _PARAMETER.finditer(text):
            regex.append(re.escape(text[position : match.start()]))
            body = match.group("body")
            if body.endswith("?"):
                if match.group(0) != text:
                    raise HostError(f"route segment {text!r}: an optional parameter must be a whole segment")
                optional = True
                body = body[:-1]
            name, _, constraint = body.partition(":")
            if "=" in name:
                raise HostError(f"route segment {text!r}: default values are not supported by the local host")
            if not _PARAMETER_NAME.match(name):
                raise HostError(f"route parameter name {name!r} is not an identifier")
            if constraint:
                if constraint not in _ROUTE_CONSTRAINTS:
                    raise HostError(f"route constraint {constraint!r} is not supported by the local host")
                constrained += 1
            regex.append(f"(?P<{name}>{_ROUTE_CONSTRAINTS.get(constraint, '.+?')})")
            names.append(name)
            position = match.end()
        regex.append(re.escape(text[position:]))
        if "{" in text[position:] or "}" in text[position:]:
            raise HostError(f"route segment {text!r} has an unbalanced brace")
        return _Segment(
            pattern=re.compile("".join(regex), re.IGNORECASE | re.DOTALL),
            names=tuple(names),
            optional=optional,
            constrained=constrained,
        )

    @property
    def specificity(self) -> tuple[int, int, int, int]:
        """Sort key: a template with more literal segments and constraints wins over a looser one."""
        literal = sum(1 for segment in self._segments if segment.literal)
        constrained = sum(segment.constrained for segment in self._segments)
        catch_all = sum(1 for segment in self._segments if segment.catch_all is not None)
        return (literal, constrained, -catch_all, len(self._segments))

    def match(self, path: str) -> dict[str, str] | None:
        """Match a request path below the route prefix (percent-encoded, no query string).

        Returns the decoded route parameters, or None when the path does not match.
        """
        stripped = path.strip("/")
        parts = [_decode_segment(part) for part in stripped.split("/")] if stripped else []
        params: dict[str, str] = {}
        index = 0
        for segment in self._segments:
            if segment.catch_all is not None:
                params[segment.catch_all] = "/".join(parts[index:])
                index = len(parts)
                break
            if index >= len(parts):
                if segment.optional:
                    continue
                return None
            assert segment.pattern is not None
            found = segment.pattern.fullmatch(parts[index])
            if not found:
                return None
            params.update(found.groupdict())
            index += 1
        if index != len(parts):
            return None
        return params


_ENCODED_SLASH = re.compile("(%2F)", re.IGNORECASE)


def _decode_segment(segment: str) -> str:
    """Percent-decode a path segment as ASP.NET Core does for the Functions host: ``%2F`` stays as sent, so a
    route parameter never gains a slash that the URL did not have."""
    pieces = _ENCODED_SLASH.split(segment)  # the escapes themselves at the odd positions
    return "".join(piece if index % 2 else unquote(piece) for index, piece in enumerate(pieces))


def strip_route_prefix(path: str, prefix: str) -> str | None:
    """Return the part of ``path`` below the route prefix, or None when the path is outside it."""
    if not prefix:
        return path
    lowered = path.lower()
    head = "/" + prefix.lower()
    if lowered == head:
        return ""
    if lowered.startswith(head + "/"):
        return path[len(head) + 1 :]
    return None
