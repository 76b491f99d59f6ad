"""Server-sent events: an incremental parser for upstream streams and the framing of one message.

Shared by every part of the data plane that reads an upstream's
`text/event-stream` or writes one to a client.
"""

from __future__ import annotations

from gateway.dataplane.upstream import UpstreamError


class EventParser:
    """Incremental parser of an upstream `text/event-stream` body (the WHATWG rules, bounded).

    Linear in the body: an unfinished line waits in one growing buffer and only
    new bytes are searched, so a large event arriving in many chunks costs no
    more than a small one per byte.
    """

    __slots__ = ("_buf", "_data", "_size", "_event", "last_id", "_skip_lf", "_limit")

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()  # the unfinished line (no line break in it)
        self._data: list[bytes] = []
        self._size = 0
        self._event = b""
        self.last_id: bytes | None = None
        self._skip_lf = False
        self._limit = limit

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """Complete events in `chunk` as (event type, data); raises UpstreamError past the size bound."""
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":  # the second half of a "\r\n" split across chunks
                chunk = chunk[1:]
        buf = self._buf
        scan = len(buf)
        buf += chunk
        events: list[tuple[bytes, bytes]] = []
        pos, end = 0, len(buf)
        while scan < end:
            lf = buf.find(b"\n", scan)
            cr = buf.find(b"\r", scan, lf if lf >= 0 else end)
            if cr >= 0:
                stop = cr
                if cr + 1 < end:
                    after = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
                else:
                    after = cr + 1
                    self._skip_lf = True
            elif lf >= 0:
                stop, after = lf, lf + 1
            else:
                break
            self._line(bytes(buf[pos:stop]), events)
            pos = scan = after
        if pos:
            del buf[:pos]
        if len(buf) + self._size > self._limit:
            raise UpstreamError(f"an upstream SSE event exceeds {self._limit} bytes")
        return events

    def _line(self, line: bytes, events: list[tuple[bytes, bytes]]) -> None:
        if not line:
            if self._data:
                events.append((self._event, b"\n".join(self._data)))
            self._data, self._size, self._event = [], 0, b""
            return
        if line[0] == 0x3A:  # ":" a comment
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._size += len(value) + 1
        elif name == b"event":
            self._event = value
        elif name == b"id" and b"\0" not in value:
            self.last_id = value


def sse_frame(message: bytes) -> bytes:
    if message.find(b"\n") != -1 or message.find(b"\r") != -1:  # find: `bytes in bytes` formats a discarded error
        # JSON allows raw line breaks between tokens; an SSE data line does not.
        # One data line per line: the receiver joins them with "\n", the same JSON.
        lines = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return b"event: message\n" + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    return b"event: message\ndata: " + message + b"\n\n"
