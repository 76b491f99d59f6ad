"""The audit spill: audit rows the database could not take, on local disk until it can.

A directory of append-only segment files. Each process appends to segments
of its own (`audit-<database>-<owner>-<n>.spill`), holds an exclusive flock
on its owner lock file (`audit-<database>-<owner>.lock`) while it lives, and
fsyncs after every batch it appends: once `append` returns, the batch
survives a crash of the process or of the machine. A segment is deleted only
after every row in it was committed to the database (`replay`), so a crash
at any point replays rows again, and the writer skips rows already there (a
row's id is its idempotency key).

A process starting up (and every so often after) adopts the segments of
owners that no longer hold their lock (a process that crashed or was killed)
for the same database, and replays them with its own, oldest first. The
database is named in file names by a hash of its name (or SQLite path), so
gateways of different databases can share a directory without replaying
each other's rows.

Line format: `<crc32 of payload, 8 hex digits> <payload JSON>\\n`, one row per
line, the payload the row as a JSON object by column name. A line that does
not end in a newline or whose checksum does not match is ignored and
counted: a torn last line is what a crash in the middle of a write leaves.
A failed append is cut back to where it began, so a torn line never sits
between good ones. Nothing here decides what to spill or when: that is the
writer's (records/writer.py).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from gateway.db import tables
from gateway.records.chain import DetailsText

logger = logging.getLogger("gateway.records")

TABLE = "audit_logs"
COLUMNS: tuple[str, ...] = tuple(c.name for c in tables.audit_logs.columns)
_UUIDS = frozenset(c.name for c in tables.audit_logs.columns if isinstance(c.type, tables.sa.Uuid))
_TIMES = frozenset(c.name for c in tables.audit_logs.columns if isinstance(c.type, tables.sa.DateTime))
SEGMENT_BYTES = 16 * 1024 * 1024
_NAME = re.compile(r"^audit-(?P<db>[0-9a-f]{12})-(?P<owner>[0-9a-z]+)(?:-(?P<n>\d{8})\.spill|\.lock)$")


def database_tag(url: str) -> str:
    """12 hex digits naming a database: a SQLite file by its path, a PostgreSQL database by its name.

    Not by host and port: the same database reached another way (a pooler, a
    failover address) must find its spill. Two clusters whose databases share
    a name need spill directories of their own if their gateways share a host.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    if scheme.startswith("sqlite"):
        ident = f"sqlite:{os.path.abspath(url.split(':///', 1)[-1])}"
    else:
        ident = f"postgresql:{parts.path.lstrip('/')}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def default_dir(database_url: str) -> Path:
    """Where spill files go unless configured: next to the SQLite file, or ./gateway-spill."""
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[-1]
        if path and path != ":memory:":
            return Path(os.path.abspath(path)).parent / "gateway-spill"
    return Path("gateway-spill").absolute()


def _default(value: Any) -> Any:
    # Details kept as their JSON text go in as that text; anything else orjson does not know as its str
    # (asyncpg's UUID subclass: ids read from the database).
    if type(value) is DetailsText:
        return orjson.Fragment(value.text)
    return str(value)


def encode_line(row: tuple) -> bytes:
    payload = orjson.dumps(dict(zip(COLUMNS, row)), default=_default, option=orjson.OPT_NON_STR_KEYS)
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode_payload(payload: bytes) -> tuple:
    values = orjson.loads(payload)
    row = []
    for name in COLUMNS:
        value = values.get(name)
        if value is not None:
            if name in _UUIDS:
                value = uuid.UUID(value)
            elif name in _TIMES:
                value = datetime.fromisoformat(value)
        row.append(value)
    return tuple(row)


@dataclass
class ReadResult:
    rows: list[tuple] = field(default_factory=list)
    torn: int = 0  # lines ignored: cut short, or failing their checksum


def read_segment(path: Path) -> ReadResult:
    """Every intact row of a segment, in order; torn or corrupt lines skipped and counted."""
    result = ReadResult()
    data = path.read_bytes()
    lines = data.split(b"\n")
    last = lines.pop()  # the text after the last newline: empty unless the last line was torn
    if last:
        result.torn += 1
    for line in lines:
        if len(line) < 10 or line[8:9] != b" ":
            result.torn += 1
            continue
        payload = line[9:]
        try:
            if int(line[:8], 16) != zlib.crc32(payload):
                result.torn += 1
                continue
            result.rows.append(decode_payload(payload))
        except ValueError:  # not hex, not JSON, not a UUID or a time: damaged
            result.torn += 1
    return result


class SpillFull(OSError):
    """The spill could not be written (disk full, permissions): the rows stay in memory."""


class Spill:
    """One process's spill segments in `directory`, plus those it adopted. Blocking file I/O:
    the writer calls every method here from a worker thread (asyncio.to_thread)."""

    def __init__(self, directory: str | os.PathLike[str], database_url: str, *,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = Path(directory)
        self.tag = database_tag(database_url)
        self.segment_bytes = segment_bytes
        self.owner = f"{time.time_ns():x}{os.getpid():x}{uuid.uuid4().hex[:6]}"
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the segment being appended to
        self._size = 0
        self._next = 0
        self._segment: Path | None = None
        # Segments holding rows not yet committed, oldest first, each with its row count.
        self.pending: list[tuple[Path, int]] = []
        self._adopted_locks: list[tuple[int, Path]] = []
        self.rows_pending = 0
        self.torn_total = 0
        # Every method runs in a worker thread; a stop() that gives up on a write may start
        # another before the first one returned. One at a time, so lines never interleave.
        self._io = threading.Lock()

    # ------------------------------------------------------------ appending

    def append(self, rows: list[tuple]) -> None:
        """Append `rows` to the current segment and fsync; on return they are on disk. Raises SpillFull."""
        data = b"".join(encode_line(row) for row in rows)
        with self._io:
            self._append(data, len(rows))

    def _append(self, data: bytes, count: int) -> None:
        try:
            if self._fd is None or self._size >= self.segment_bytes:
                self._open_segment()
            start = self._size
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                os.fsync(self._fd)
            except OSError:
                # Cut back what was written of this batch, so the next append does not
                # follow a torn line; if even that fails, start a new segment next time.
                try:
                    os.ftruncate(self._fd, start)
                    os.fsync(self._fd)
                except OSError:
                    self._close_segment()
                raise
        except OSError as exc:
            raise SpillFull(exc.errno or errno.EIO, f"cannot write the audit spill in {self.directory}: "
                            f"{exc.strerror or exc}") from exc
        self._size += len(data)
        if not self.pending or self.pending[-1][0] != self._segment:
            self.pending.append((self._segment, 0))
        path, rows = self.pending[-1]
        self.pending[-1] = (path, rows + count)
        self.rows_pending += count

    def _open_segment(self) -> None:
        self._close_segment()
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._lock_fd is None:
            lock_path = self.directory / f"audit-{self.tag}-{self.owner}.lock"
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock_fd = fd
        self._next += 1
        path = self.directory / f"audit-{self.tag}-{self.owner}-{self._next:08d}.spill"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._segment, self._size = path, 0
        _fsync_dir(self.directory)  # the new name survives a crash too

    def _close_segment(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._segment, self._size = None, None, 0

    def seal(self) -> None:
        """End the current segment: later appends go to a new one, so this one can be replayed and deleted."""
        self._close_segment()

    # ------------------------------------------------------------ replaying

    def is_own(self, path: Path) -> bool:
        """Whether `path` is a segment this process wrote (not one it adopted)."""
        return _owner(path) == self.owner

    def oldest(self) -> tuple[Path, ReadResult] | None:
        """The oldest pending segment and its rows (sealed first if it is the current one)."""
        with self._io:
            if not self.pending:
                return None
            path, _count = self.pending[0]
            if path == self._segment:
                self.seal()
        try:
            result = read_segment(path)
        except FileNotFoundError:  # removed behind our back: nothing left to replay from it
            result = ReadResult()
        if result.torn:
            self.torn_total += result.torn
            logger.warning("audit spill %s: %d torn or damaged lines ignored (an interrupted write)",
                           path.name, result.torn)
        return path, result

    def done(self, path: Path) -> None:
        """Every row of `path` is committed: delete it."""
        with self._io:
            count = 0
            for i, (pending, rows) in enumerate(self.pending):
                if pending == path:
                    count = rows
                    del self.pending[i]
                    break
            self.rows_pending -= count
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:  # replayed again by whoever finds it next: its rows are skipped then
                logger.error("cannot delete the replayed audit spill segment %s: %s", path, exc)
            self._release_adopted()

    def keep_rejected(self, rows: list[tuple]) -> None:
        """Rows the database refused (never expected: entries are bounded to fit): kept aside, never replayed."""
        with self._io:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / f"audit-{self.tag}-rejected.jsonl", "ab") as fh:
                fh.write(b"".join(encode_line(row) for row in rows))
                fh.flush()
                os.fsync(fh.fileno())

    # ------------------------------------------------------------ adopting

    def adopt(self) -> int:
        """Take over the segments of owners (same database) that no longer hold their lock; rows adopted."""
        with self._io:
            return self._adopt()

    def _adopt(self) -> int:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return 0
        owners: dict[str, list[Path]] = {}
        for name in names:
            match = _NAME.match(name)
            if match is None or match["db"] != self.tag or match["owner"] == self.owner:
                continue
            segments = owners.setdefault(match["owner"], [])
            if match["n"] is not None:
                segments.append(self.directory / name)
        adopted = 0
        known = {path for path, _ in self.pending}
        for owner, segments in sorted(owners.items()):
            lock_path = self.directory / f"audit-{self.tag}-{owner}.lock"
            fd = _lock_if_free(lock_path)
            if fd is None:
                continue  # alive (or a lock file we could not open): its segments are its own
            for path in segments:
                if path in known or not path.exists():
                    continue
                count = sum(1 for _ in _lines(path))
                self.pending.append((path, count))
                self.rows_pending += count
                adopted += count
            self._adopted_locks.append((fd, lock_path))
        # Adopted segments are older than ours: replay them first (owner names start with their start time).
        self.pending.sort(key=lambda item: (_owner(item[0]) == self.owner, item[0].name))
        self._release_adopted()
        return adopted

    def _release_adopted(self) -> None:
        """Drop the locks of adopted owners none of whose segments are pending any more."""
        owners_pending = {_owner(path) for path, _ in self.pending}
        kept = []
        for fd, lock_path in self._adopted_locks:
            if _owner(lock_path) in owners_pending:
                kept.append((fd, lock_path))
                continue
            try:
                lock_path.unlink()
            except FileNotFoundError:
                pass
            os.close(fd)
        self._adopted_locks = kept

    def close(self) -> None:
        """Release the files; pending segments stay on disk for the next process to adopt."""
        with self._io:
            self._close()

    def _close(self) -> None:
        self._close_segment()
        for fd, _path in self._adopted_locks:
            os.close(fd)
        self._adopted_locks.clear()
        if self._lock_fd is not None:
            if not self.pending:
                try:
                    (self.directory / f"audit-{self.tag}-{self.owner}.lock").unlink()
                except FileNotFoundError:
                    pass
            os.close(self._lock_fd)
            self._lock_fd = None


def _owner(path: Path) -> str:
    return _NAME.match(path.name)["owner"]


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        for line in fh:
            if line.endswith(b"\n"):
                yield line


def _lock_if_free(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR)  # never created here: a vanished lock file was released by an adopter
    except FileNotFoundError:
        # An owner whose lock file is gone but whose segments remain (its adopter was
        # killed between deleting the lock and the segments, or files were copied here).
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    if os.fstat(fd).st_nlink == 0:  # unlinked by an adopter between our open and our lock
        os.close(fd)
        return None
    return fd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["SEGMENT_BYTES", "ReadResult", "Spill", "SpillFull", "database_tag", "default_dir", "read_segment"]
