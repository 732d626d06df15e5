"""The one error of the local host: the app, its host.json or its settings cannot run here."""

from __future__ import annotations


class HostError(Exception):
    """The app, its host.json or its settings cannot run under this host; the message names what to fix."""
