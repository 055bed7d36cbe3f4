"""What both relays do the same way: the Relay contract's bookkeeping around each relay's own
frame handling.

Both relays keep one state object per side (`_client`, `_backend`, each with `done` and `take()`),
count bytes in `stats`, and feed the client under an optional allowance (a message and byte budget
from the rate limits, `limit_client`): with none set, `feed_client` goes straight to the relay's
`_feed`, so an unlimited session pays one comparison per read. What differs (how a frame is
parsed, forwarded or re-framed, and where input over the allowance is held) stays in each relay.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from wsproxy.protocol.relay import NO_MESSAGE_LIMIT, RelayStats


class RelayBase(ABC):
    """The shared half of PassthroughRelay and InspectRelay (subclasses set the rest)."""

    __slots__ = ("_byte_left", "_msg_stop")  # the client's allowance (limit_client)

    _client: Any
    _backend: Any
    _byte_left: int | None
    _msg_stop: int
    stats: RelayStats

    @abstractmethod
    def _feed(self, src: Any, dst: Any, data: bytes) -> None:
        """Each relay's own frame handling of `data` read from `src`."""

    @abstractmethod
    def _feed_within(self, data: bytes) -> None:
        """feed_client under an allowance: each relay holds what is over it its own way."""

    @abstractmethod
    def _send_close(self, hop: Any, code: int | None, reason: str) -> None:
        """Queue the proxy's close frame for `hop` (each relay frames it its own way)."""

    def _pay_owed(self, hop: Any) -> bool:
        """Send `hop` the close of its protocol error, if one is owed (then it is done): the
        erring side hears its close only after the other side's close arrived (or its stream ended),
        so replies already in flight reach it first."""
        owed = hop.owed
        if owed is None:
            return False
        hop.owed = None
        self._send_close(hop, owed[0], owed[1])
        hop.failed = True
        return True

    @property
    def client_done(self) -> bool:
        """Nothing more to or from the client, and no own frame still waits for it."""
        done: bool = self._client.done
        return done

    @property
    def backend_done(self) -> bool:
        """Nothing more to or from the backend, and no own frame still waits for it."""
        done: bool = self._backend.done
        return done

    def take_for_client(self) -> bytes:
        data: bytes = self._client.take()
        return data

    def take_for_backend(self) -> bytes:
        data: bytes = self._backend.take()
        return data

    def feed_client(self, data: bytes) -> None:
        """Bytes read from the client (b"" when its stream ended)."""
        self.stats.client_bytes_in += len(data)
        if self._byte_left is None and self._msg_stop == NO_MESSAGE_LIMIT:
            self._feed(self._client, self._backend, data)
        else:
            self._feed_within(data)

    def feed_backend(self, data: bytes) -> None:
        """Bytes read from the backend (b"" when its stream ended)."""
        self.stats.backend_bytes_in += len(data)
        self._feed(self._backend, self._client, data)

    def limit_client(self, *, messages: int | None, nbytes: int | None) -> None:
        """The client's allowance from here on (relay.Relay.limit_client)."""
        self._msg_stop = NO_MESSAGE_LIMIT if messages is None else self.stats.messages_to_backend + messages
        self._byte_left = nbytes

    def client_allowance(self) -> tuple[int | None, int | None]:
        stop = self._msg_stop
        return (None if stop == NO_MESSAGE_LIMIT else stop - self.stats.messages_to_backend), self._byte_left

    def _spent(self) -> bool:
        return self._byte_left == 0 or self.stats.messages_to_backend >= self._msg_stop
