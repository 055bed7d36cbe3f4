"""The two sides of a session, as one type: `Side.CLIENT` and `Side.BACKEND`.

A session joins a client and a backend; relays, the heartbeat schedule, metrics and the session
log all speak of one or the other. They name it with this enum (parameters called `side`), not
with strings spelled several ways. A `StrEnum` equals its string and prints as it, so metric label
values, log text and code that still passes "client"/"backend" see exactly what they did.
"""

from __future__ import annotations

import enum


class Side(enum.StrEnum):
    """One end of a session."""

    CLIENT = "client"
    BACKEND = "backend"

    @property
    def other(self) -> Side:
        """The opposite end of the same session."""
        return Side.BACKEND if self is Side.CLIENT else Side.CLIENT


SIDES = (Side.CLIENT, Side.BACKEND)
