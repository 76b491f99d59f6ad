"""Capability discovery: what each upstream offers, stored in the schema, with tool-definition pinning.

This module owns reading an upstream's capabilities through the gateway's own
MCP client (`dataplane/mcp_client.py` and its stdio/SSE/WebSocket twins, so
both protocol eras and every transport work; a stdio, SSE or WebSocket server
is read over a process or connection of discovery's own, since the data
plane's one stream per server cannot tell whose a server's question is while
discovery's requests share it), every page of `tools/list`,
`resources/list`, `resources/templates/list` and `prompts/list`, and storing
them in `server_tools`, `server_resources`, `server_resource_templates` and
`server_prompts` in one transaction (upsert; rows that disappeared upstream are
deleted). A failed discovery keeps the rows it had and records why in
`mcp_servers.discovery_error`.

Pinning: a tool's definition (name, title, description, inputSchema,
outputSchema, annotations) is hashed (SHA-256 of canonical JSON). The first
definition seen is approved by itself. A later different one is flagged
(`pin_status = 'changed'`, `changed_at`), logged as a warning, and the approved
hash and definition stay as they were until an admin approves the new one
(`registry/catalog.py`). A tenant whose settings say `"tool_pinning":
"withhold"` does not see a flagged tool on the data plane (snapshot.py,
dataplane/enforce.py).

`Discoverer` runs discoveries: on registration (the control plane asks after
it created a server), when a server's endpoint, transport or credential
changes (every process sees it in its snapshot; one takes a lease and
discovers), on a schedule per server (`discovery_interval`), when the list
watcher sees an upstream's lists change, and on demand. With several gateway processes only one discovers a given
server per interval: a lease `SET <prefix>discovery:<server id> NX PX` on
Redis (in process without Redis).

It must not run on the request path, and never touches what the data plane
serves except through the configuration version: when a stored change is one
the snapshot holds (a tool's pin status, or annotations the retry policy may
read), the version is bumped and every process reloads.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.config import UpstreamSettings
from gateway.controlplane.service import bump_version
from gateway.dataplane.jsonrpc import METHOD_NOT_FOUND
from gateway.dataplane.mcp_client import UpstreamRpcError
from gateway.dataplane.upstream import UpstreamError
from gateway.db.tables import (
    mcp_servers,
    server_prompts,
    server_resource_templates,
    server_resources,
    server_tools,
    utcnow,
)
from gateway.snapshot import ServerEntry

log = logging.getLogger("gateway.discovery")

# Pages read of one list before discovery gives up (a server handing out cursors forever).
MAX_PAGES = 100
# The longest one discovery may take, all lists together.
DEADLINE = 60.0
# A failed discovery is tried again this soon (or at the server's interval, if shorter).
RETRY_AFTER = 30.0
# A server the scheduler sees for the first time waits this long (plus jitter): its
# registration has asked for a discovery already, in the process that registered it.
FIRST_SIGHT_GRACE = 2.0
# The list watcher of every process may see the same upstream change: one reacts per window.
CHANGE_WINDOW = 5.0
# Transports whose one stream (a process, a connection) carries every call multiplexed: the
# gateway cannot tell which call a server's question is for while another request is in flight
# (dataplane/multiplexed.py), so discovery reads these servers over a stream of its own.
OWN_STREAM = frozenset({"stdio", "sse", "websocket"})
_MAX_ERROR = 2000
# list kind -> (list method, key of the items in the result, the capability that announces it)
LISTS = {
    "tools": ("tools/list", "tools", "tools"),
    "resources": ("resources/list", "resources", "resources"),
    "resource_templates": ("resources/templates/list", "resourceTemplates", "resources"),
    "prompts": ("prompts/list", "prompts", "prompts"),
}


class DiscoveryFailed(Exception):
    """The upstream could not be discovered; the message says why, for `mcp_servers.discovery_error`."""


class NotServed(Exception):
    """The server is not in the configuration this process serves (unknown, or inactive)."""


# -- tool definitions -------------------------------------------------------------------------------
def definition_of(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a tool that pinning protects: what a model reads and what a call takes and gives."""
    return {
        "name": tool.get("name"),
        "title": tool.get("title"),
        "description": tool.get("description"),
        "inputSchema": tool.get("inputSchema"),
        "outputSchema": tool.get("outputSchema"),
        "annotations": tool.get("annotations"),
    }


def definition_hash(definition: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the definition as canonical JSON: sorted keys, no spaces, UTF-8."""
    return hashlib.sha256(orjson.dumps(definition, option=orjson.OPT_SORT_KEYS)).hexdigest()


# -- fetching ---------------------------------------------------------------------------------------
@dataclass
class Fetched:
    """What one upstream offers, as it answered (items keyed by name or URI, in its order)."""

    capabilities: dict[str, Any]
    lists: dict[str, dict[str, dict[str, Any]]]
    notes: list[str] = field(default_factory=list)  # items left out, and why


async def fetch(client: Any, *, max_pages: int = MAX_PAGES) -> Fetched:
    """Every page of every list the upstream announces. Raises DiscoveryFailed.

    `client` is the data plane's MCP client of the server (UpstreamClient,
    StdioUpstream, ChannelUpstream): it knows the server's era, holds its
    session and presents the gateway's own credential.
    """
    try:
        capabilities = await client.ensure_ready()
        if getattr(client, "era", None) == "modern":
            # Asked afresh: the client remembers what the server said when it first met it.
            answer = await client.request("server/discover", {})
            if isinstance(answer.get("capabilities"), dict):
                capabilities = answer["capabilities"]
        capabilities = capabilities if isinstance(capabilities, dict) else {}
        fetched = Fetched(capabilities=capabilities, lists={})
        for kind, (method, key, capability) in LISTS.items():
            if capability not in capabilities:
                fetched.lists[kind] = {}  # not announced: the server offers none
                continue
            items = await _every_page(client, method, key, max_pages)
            fetched.lists[kind] = _keyed(kind, items, fetched.notes)
        return fetched
    except UpstreamRpcError as exc:
        raise DiscoveryFailed(f"the server answered with an error: {exc.error.get('message', exc)}") from None
    except (UpstreamError, OSError) as exc:
        raise DiscoveryFailed(f"the server is unreachable or broke the exchange: {exc}") from None


async def _every_page(client: Any, method: str, key: str, max_pages: int) -> list[Any]:
    items: list[Any] = []
    cursor = None
    seen: set[str] = set()
    for _ in range(max_pages):
        try:
            result = await client.request(method, {"cursor": cursor} if cursor else {})
        except UpstreamRpcError as exc:
            if exc.error.get("code") == METHOD_NOT_FOUND and not items:
                return []  # announced but not served (templates, typically): nothing to store
            raise DiscoveryFailed(f"{method}: the server answered with an error: {exc.error.get('message')}") from None
        page = result.get(key)
        if isinstance(page, list):
            items.extend(page)
        cursor = result.get("nextCursor")
        if not cursor:
            return items
        if not isinstance(cursor, str) or cursor in seen:
            raise DiscoveryFailed(f"{method}: the server gave a cursor it had given before (or not a string)")
        seen.add(cursor)
    raise DiscoveryFailed(f"{method}: more than {max_pages} pages; the gateway reads at most {max_pages}")


# kind -> (the item's key field, its column's length, the other string fields and their column lengths)
_SHAPES = {
    "tools": ("name", 255, {"title": 255}),
    "resources": ("uri", 2048, {"name": 255, "title": 255, "mimeType": 255}),
    "resource_templates": ("uriTemplate", 2048, {"name": 255, "title": 255, "mimeType": 255}),
    "prompts": ("name", 255, {"title": 255}),
}


def _keyed(kind: str, items: list[Any], notes: list[str]) -> dict[str, dict[str, Any]]:
    """Items by key; malformed ones and repeats are left out and noted. Display fields too long are cut."""
    key_field, key_max, fields = _SHAPES[kind]
    keyed: dict[str, dict[str, Any]] = {}
    for item in items:
        key = item.get(key_field) if isinstance(item, dict) else None
        if not isinstance(key, str) or not 0 < len(key) <= key_max:
            notes.append(f"{kind}: left out an item whose {key_field} is missing, not a string or over {key_max}")
            continue
        if key in keyed:
            notes.append(f"{kind}: {key!r} is listed twice; the first is kept")
            continue
        for name, limit in fields.items():
            value = item.get(name)
            if value is not None and not isinstance(value, str):
                item = {**item, name: None}
            elif isinstance(value, str) and len(value) > limit:
                item = {**item, name: value[:limit]}
        keyed[key] = item
    return keyed


# -- storing ----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One discovery: what was stored, or why nothing was."""

    server_id: uuid.UUID
    ok: bool
    error: str | None = None
    discovered_at: datetime | None = None
    capabilities: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    added: dict[str, list[str]] = field(default_factory=dict)
    updated: dict[str, list[str]] = field(default_factory=dict)
    removed: dict[str, list[str]] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)  # tools whose definition changed from the approved one
    restored: list[str] = field(default_factory=list)  # tools back at their approved definition
    notes: list[str] = field(default_factory=list)
    # Whether something the snapshot holds changed (the configuration version was bumped).
    configuration_changed: bool = False

    @property
    def changed(self) -> bool:
        return any(self.added.values()) or any(self.updated.values()) or any(self.removed.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "server_id": self.server_id, "ok": self.ok, "error": self.error, "discovered_at": self.discovered_at,
            "capabilities": self.capabilities, "counts": self.counts, "added": self.added, "updated": self.updated,
            "removed": self.removed, "flagged": self.flagged, "restored": self.restored, "notes": self.notes,
            "configuration_changed": self.configuration_changed,
        }


def _tool_values(tool: dict[str, Any]) -> dict[str, Any]:
    schema = tool.get("inputSchema")
    return {
        "description": tool.get("description") if isinstance(tool.get("description"), str) else None,
        "input_schema": schema if isinstance(schema, dict) else {},
        "annotations": tool.get("annotations") if isinstance(tool.get("annotations"), dict) else None,
        "title": tool.get("title"),
        "output_schema": tool.get("outputSchema") if isinstance(tool.get("outputSchema"), dict) else None,
    }


def _described(item: dict[str, Any], *names: str) -> dict[str, Any]:
    columns = {"mimeType": "mime_type"}
    values = {columns.get(n, n): item.get(n) for n in names}
    if "description" in values and not isinstance(values["description"], str):
        values["description"] = None
    if "annotations" in values and not isinstance(values["annotations"], dict):
        values["annotations"] = None
    return values


def _resource_values(item: dict[str, Any]) -> dict[str, Any]:
    return _described(item, "name", "title", "description", "mimeType", "annotations")


def _prompt_values(item: dict[str, Any]) -> dict[str, Any]:
    arguments = item.get("arguments")
    return {**_described(item, "title", "description"), "arguments": arguments if isinstance(arguments, list) else []}


# kind -> (table, key column, item -> column values)
_TABLES: dict[str, tuple[sa.Table, str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "tools": (server_tools, "name", _tool_values),
    "resources": (server_resources, "uri", _resource_values),
    "resource_templates": (server_resource_templates, "uri_template", _resource_values),
    "prompts": (server_prompts, "name", _prompt_values),
}


async def store(engine: AsyncEngine, server_id: uuid.UUID, fetched: Fetched) -> Outcome:
    """Store one discovery in one transaction: upsert what is listed, delete what is gone, pin tools.

    The server's row is locked first, so two discoveries of one server (two
    processes, or a scheduled one and one on demand) store one after the other.
    """
    now = utcnow()
    outcome = Outcome(server_id=server_id, ok=True, discovered_at=now, capabilities=fetched.capabilities,
                      notes=list(fetched.notes))
    async with engine.begin() as conn:
        server = (
            await conn.execute(
                sa.select(mcp_servers.c.tenant_id, mcp_servers.c.name)
                .where(mcp_servers.c.id == server_id).with_for_update()
            )
        ).first()
        if server is None:
            raise NotServed("the server was unregistered while it was being discovered")
        relevant = False
        for kind, (table, key_column, values_of) in _TABLES.items():
            items = fetched.lists.get(kind, {})
            existing = {
                r[key_column]: r
                for r in (await conn.execute(sa.select(table).where(table.c.server_id == server_id))).mappings()
            }
            desired = {key: values_of(item) for key, item in items.items()}
            if kind == "tools":
                relevant |= _pin(server.name, items, desired, existing, now, outcome)
                relevant |= any(
                    existing[k]["annotations"] != desired[k]["annotations"] for k in desired if k in existing
                )
                relevant |= any(existing[k]["pin_status"] == "changed" for k in existing if k not in desired)
            await _sync(conn, table, key_column, server_id, server.tenant_id, desired, existing, now, kind, outcome)
            outcome.counts[kind] = len(desired)
        await conn.execute(
            sa.update(mcp_servers).where(mcp_servers.c.id == server_id).values(
                capabilities=fetched.capabilities, discovered_at=now, discovery_error=None,
                updated_at=mcp_servers.c.updated_at,  # discovery is not a change of the server's configuration
            )
        )
        if relevant:
            await bump_version(conn)
            outcome.configuration_changed = True
    return outcome


def _pin(
    server: str, items: dict[str, dict], desired: dict[str, dict], existing: Mapping[str, Any], now: datetime,
    outcome: Outcome,
) -> bool:
    """Add the pinning columns to each desired tool row; True when a pin status changes."""
    moved = False
    for name, item in items.items():
        definition = definition_of(item)
        digest = definition_hash(definition)
        row = existing.get(name)
        values = desired[name]
        values["definition_hash"] = digest
        if row is None or not row["approved_hash"]:
            # First sight (or a row from before pinning existed): this definition is the approved one.
            values.update(approved_hash=digest, approved_definition=definition, pin_status="approved", changed_at=None)
            moved |= row is not None and row["pin_status"] != "approved"
        elif digest == row["approved_hash"]:
            if row["pin_status"] != "approved":
                values["pin_status"] = "approved"
                outcome.restored.append(name)
                moved = True
                log.info("server %s: tool %r is back at its approved definition", server, name)
        elif digest != row["definition_hash"] or row["pin_status"] != "changed":
            values.update(pin_status="changed", changed_at=now)
            outcome.flagged.append(name)
            moved |= row["pin_status"] != "changed"
            log.warning(
                "server %s: tool %r changed its definition since it was approved (approved %s, now %s); "
                "it is flagged until an admin approves it", server, name, row["approved_hash"][:12], digest[:12],
            )
    return moved


async def _sync(
    conn: AsyncConnection, table: sa.Table, key_column: str, server_id: uuid.UUID, tenant_id: uuid.UUID,
    desired: dict[str, dict[str, Any]], existing: Mapping[str, Any], now: datetime, kind: str, outcome: Outcome,
) -> None:
    added, updated = [], []
    for key, values in desired.items():
        row = existing.get(key)
        if row is None:
            await conn.execute(sa.insert(table).values(
                id=uuid.uuid4(), tenant_id=tenant_id, server_id=server_id, **{key_column: key}, **values,
                created_at=now, updated_at=now,
            ))
            added.append(key)
        elif any(row[column] != value for column, value in values.items()):
            await conn.execute(sa.update(table).where(table.c.id == row["id"]).values(**values, updated_at=now))
            updated.append(key)
    gone = [key for key in existing if key not in desired]
    if gone:
        await conn.execute(sa.delete(table).where(table.c.id.in_([existing[key]["id"] for key in gone])))
    outcome.added[kind], outcome.updated[kind], outcome.removed[kind] = added, updated, gone


async def record_failure(engine: AsyncEngine, server_id: uuid.UUID, error: str) -> None:
    """Note why a discovery failed; what the last one stored stays as it is."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.update(mcp_servers).where(mcp_servers.c.id == server_id).values(
                discovery_error=error[:_MAX_ERROR], updated_at=mcp_servers.c.updated_at,
            )
        )


# -- one discovery at a time per server, across processes -------------------------------------------
_RELEASE_TO = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


class Leases:
    """Who discovers a server now: `SET key NX PX` on Redis, or a dict in this process without Redis.

    A lease is held for the server's whole discovery interval, so it also says
    "discovered recently": another process asking within the interval is told
    how long until it may ask again. If Redis fails, the decision is local (each
    process may then discover; storing is serialized by the database anyway).
    """

    def __init__(self, redis: Any = None, prefix: str = "gw:") -> None:
        self.redis = redis
        self.prefix = f"{prefix}discovery:"
        self.token = uuid.uuid4().hex  # this process
        self._local: dict[str, float] = {}
        self._redis_failing = False

    async def acquire(self, name: str, seconds: float) -> tuple[bool, float]:
        """Take the lease if nobody holds it: (True, 0), or (False, seconds until it is free)."""
        ms = max(1, int(seconds * 1000))
        if self.redis is not None:
            try:
                key = self.prefix + name
                if await self.redis.set(key, self.token, nx=True, px=ms):
                    return self._redis_ok(True, 0.0)
                left = await self.redis.pttl(key)
                return self._redis_ok(False, max(left, 0) / 1000 if left and left > 0 else 0.1)
            except Exception as exc:  # noqa: BLE001 - Redis down: decide in process
                self._redis_down(exc)
        now = time.monotonic()
        until = self._local.get(name, 0.0)
        if until > now:
            return False, until - now
        self._local[name] = now + seconds
        return True, 0.0

    async def claim(self, name: str, seconds: float) -> None:
        """Hold the lease whoever held it (registration and on-demand discoveries do not wait)."""
        if self.redis is not None:
            try:
                await self.redis.set(self.prefix + name, self.token, px=max(1, int(seconds * 1000)))
                self._redis_ok(True, 0.0)
                return
            except Exception as exc:  # noqa: BLE001
                self._redis_down(exc)
        self._local[name] = time.monotonic() + seconds

    async def shorten(self, name: str, seconds: float) -> None:
        """Let the lease end in `seconds` (after a failure, to try again sooner), if it is still ours."""
        if self.redis is not None:
            try:
                await self.redis.eval(_RELEASE_TO, 1, self.prefix + name, self.token, max(1, int(seconds * 1000)))
                return
            except Exception as exc:  # noqa: BLE001
                self._redis_down(exc)
        if name in self._local:
            self._local[name] = min(self._local[name], time.monotonic() + seconds)

    def _redis_ok(self, held: bool, left: float) -> tuple[bool, float]:
        if self._redis_failing:
            log.info("discovery leases are shared through Redis again")
            self._redis_failing = False
        return held, left

    def _redis_down(self, exc: Exception) -> None:
        if not self._redis_failing:
            log.warning("discovery leases fall back to this process (Redis: %s)", exc)
            self._redis_failing = True


# -- the discoverer ---------------------------------------------------------------------------------
class Discoverer:
    """Runs discoveries: on registration, on a schedule per server, on upstream list changes, on demand.

    `client_for(server)` gives the MCP client of a server (the data plane's,
    `DataPlane.client_for`); `own_clients` (OneShotClients) opens a stream of
    discovery's own for the transports in OWN_STREAM, closed after each
    discovery. `on_change()` signals a configuration change to every process
    (`SnapshotStore.publish_change`), called after a discovery bumped the version.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        store: Any,
        client_for: Callable[[ServerEntry], Any],
        *,
        on_change: Callable[[], Awaitable[None]],
        own_clients: OneShotClients | None = None,
        defaults: UpstreamSettings | None = None,
        redis: Any = None,
        key_prefix: str = "gw:",
        deadline: float = DEADLINE,
        concurrency: int = 4,
        retry_after: float = RETRY_AFTER,
        max_pages: int = MAX_PAGES,
    ) -> None:
        self.engine = engine
        self.store = store
        self.client_for = client_for
        self.own_clients = own_clients
        self.on_change = on_change
        self.defaults = defaults or UpstreamSettings()  # the `[upstreams]` section (validates PATCHed settings)
        self.leases = Leases(redis, key_prefix)
        self.deadline = deadline
        self.retry_after = retry_after
        self.max_pages = max_pages
        self.runs = 0  # discoveries this process made (stored or failed)
        self._slots = asyncio.Semaphore(concurrency)
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}
        self._due: dict[uuid.UUID, float] = {}  # server -> when the scheduler looks at it next (loop time)
        self._where: dict[uuid.UUID, tuple] = {}  # server -> how it was reached when last seen (_where)
        self._requested: set[uuid.UUID] = set()  # asked for, not started yet
        self._tasks: set[asyncio.Task] = set()
        self._releasing: set[asyncio.Future] = set()  # own streams being closed
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._subscribed = False

    # -- life ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the schedule: each server of the snapshot is discovered once per its interval."""
        if not self._subscribed:
            self.store.on_change(self._on_snapshot)
            self._subscribed = True
        self._scheduler = asyncio.create_task(self._schedule(), name="discovery-schedule")

    async def stop(self) -> None:
        """Stop the schedule and every discovery in flight (what was stored stays stored)."""
        tasks = [t for t in (self._scheduler, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._scheduler = None
        self._tasks.clear()
        await asyncio.gather(*self._releasing, return_exceptions=True)
        if self.own_clients is not None:
            await self.own_clients.close()

    def _on_snapshot(self, snapshot: Any) -> None:
        self._wake.set()

    # -- triggers -------------------------------------------------------------------------------------
    async def discover(self, server_id: uuid.UUID) -> Outcome:
        """Discover the server now and return what happened (on demand). Raises NotServed."""
        server = self._entry(server_id)
        if server is None:
            raise NotServed("the server is not served (inactive, or not in the configuration yet)")
        return await self._run(server, claim=True)

    def request(self, server_id: uuid.UUID) -> None:
        """Discover the server soon, in the background (after its registration, in the registering process)."""
        if server_id in self._requested:
            return  # one is waiting to start: it will see the latest configuration
        self._requested.add(server_id)
        self._spawn(self._requested_run(server_id))

    def upstream_changed(self, server: ServerEntry) -> None:
        """The list watcher saw this server's lists change: discover it again (one process per change)."""
        self._spawn(self._changed_run(server.id))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _requested_run(self, server_id: uuid.UUID) -> None:
        try:
            async with self._slots:
                self._requested.discard(server_id)
                server = self._entry(server_id)
                if server is not None:
                    await self._run(server, claim=True)
        finally:
            self._requested.discard(server_id)

    async def _changed_run(self, server_id: uuid.UUID) -> None:
        held, _ = await self.leases.acquire(f"changed:{server_id}", CHANGE_WINDOW)
        if held:
            log.info("server %s: its lists changed upstream; discovering it again", server_id)
            self.request(server_id)

    async def _moved_run(self, server: ServerEntry) -> None:
        # Every process sees the change in its snapshot; the first to take this lease discovers.
        where = hashlib.blake2b(orjson.dumps(_where(server)), digest_size=8).hexdigest()
        held, _ = await self.leases.acquire(f"moved:{server.id}:{where}", CHANGE_WINDOW)
        if held:
            log.info("server %s: its endpoint, transport or credential changed; discovering it again", server.name)
            self.request(server.id)

    # -- one discovery ----------------------------------------------------------------------------------
    def _entry(self, server_id: uuid.UUID) -> ServerEntry | None:
        for server in self.store.current.servers.values():
            if server.id == server_id:
                return server
        return None

    def _interval(self, server: ServerEntry) -> float:
        settings = getattr(server, "settings", None) or self.defaults
        return settings.discovery_interval

    async def _run(self, server: ServerEntry, *, claim: bool) -> Outcome:
        lock = self._locks.setdefault(server.id, asyncio.Lock())
        async with lock:
            interval = self._interval(server)
            if claim:
                await self.leases.claim(str(server.id), interval)
            loop = asyncio.get_running_loop()
            self.runs += 1
            try:
                async with asyncio.timeout(self.deadline):
                    fetched = await self._fetch(server)
            except (DiscoveryFailed, TimeoutError) as exc:
                error = str(exc) if isinstance(exc, DiscoveryFailed) else f"no answer within {self.deadline:g}s"
                log.warning("server %s: discovery failed: %s", server.name, error)
                await record_failure(self.engine, server.id, error)
                retry = min(interval, self.retry_after)
                await self.leases.shorten(str(server.id), retry)
                self._due[server.id] = loop.time() + retry
                return Outcome(server_id=server.id, ok=False, error=error)
            outcome = await store(self.engine, server.id, fetched)
            self._due[server.id] = loop.time() + interval
            if outcome.changed:
                log.info("server %s: discovered %s", server.name,
                         ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in outcome.counts.items()))
            if outcome.configuration_changed:
                await self.on_change()
            return outcome

    async def _fetch(self, server: ServerEntry) -> Fetched:
        if self.own_clients is None or server.transport_type not in OWN_STREAM:
            return await fetch(self.client_for(server), max_pages=self.max_pages)
        client = self.own_clients.client_for(server)
        try:
            return await fetch(client, max_pages=self.max_pages)
        finally:
            # Not cancelled with the discovery: a process is stopped and reaped, never abandoned (stop() waits).
            release = asyncio.ensure_future(self.own_clients.release(client))
            self._releasing.add(release)
            release.add_done_callback(self._releasing.discard)
            await asyncio.shield(release)

    # -- the schedule -------------------------------------------------------------------------------------
    async def _schedule(self) -> None:
        while True:
            wait = 30.0
            try:
                wait = await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the schedule goes on
                log.exception("the discovery schedule failed; it goes on")
            self._wake.clear()
            try:
                async with asyncio.timeout(max(wait, 0.05)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _tick(self) -> float:
        """Start the discoveries that are due; return how long until the next one."""
        servers = {s.id: s for s in self.store.current.servers.values()}
        for gone in [i for i in self._due if i not in servers]:
            del self._due[gone]
            self._locks.pop(gone, None)
            self._where.pop(gone, None)
        for server in servers.values():
            before = self._where.get(server.id)
            self._where[server.id] = _where(server)
            if before is not None and before != self._where[server.id]:
                self._spawn(self._moved_run(server))
        new = [i for i in servers if i not in self._due]
        if new:
            await self._first_sight(servers, new)
        now = asyncio.get_running_loop().time()
        wait = 30.0
        for server_id, due in list(self._due.items()):
            if due > now:
                wait = min(wait, due - now)
                continue
            lock = self._locks.get(server_id)
            if server_id in self._requested or (lock is not None and lock.locked()):
                self._due[server_id] = now + self._interval(servers[server_id])
                continue
            self._due[server_id] = now + self._interval(servers[server_id])  # a running one sets it again
            self._spawn(self._scheduled_run(servers[server_id]))
        return wait

    async def _first_sight(self, servers: dict[uuid.UUID, ServerEntry], new: list[uuid.UUID]) -> None:
        """When each newly seen server is due: its interval after its last discovery (now, if never)."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                sa.select(mcp_servers.c.id, mcp_servers.c.discovered_at).where(mcp_servers.c.id.in_(new))
            )).all()
        last = {r.id: r.discovered_at for r in rows}
        now = asyncio.get_running_loop().time()
        wall = utcnow()
        for server_id in new:
            discovered = last.get(server_id)
            grace = FIRST_SIGHT_GRACE + random.uniform(0, 1)
            if discovered is None:
                self._due[server_id] = now + grace
                continue
            if discovered.tzinfo is None:  # SQLite hands back naive UTC
                discovered = discovered.replace(tzinfo=wall.tzinfo)
            age = (wall - discovered).total_seconds()
            self._due[server_id] = now + max(grace, self._interval(servers[server_id]) - age)

    async def _scheduled_run(self, server: ServerEntry) -> None:
        interval = self._interval(server)
        held, left = await self.leases.acquire(str(server.id), interval)
        if not held:
            # Another process discovered it within the interval: look again when its lease ends.
            self._due[server.id] = asyncio.get_running_loop().time() + left + random.uniform(0, 1)
            return
        async with self._slots:
            current = self._entry(server.id)
            if current is not None:
                await self._run(current, claim=False)


def _where(server: ServerEntry) -> tuple:
    """How a server is reached: a change of any of these is a change of what it may offer."""
    return (server.transport_type, server.endpoint_url, server.auth_sealed)


# -- streams of discovery's own, and clients outside a running gateway (the CLI) -------------------------
class OneShotClients:
    """MCP clients of discovery's own: streams for OWN_STREAM transports, or every client when no
    data plane runs in this process (`gateway servers discover`). `release` closes one."""

    def __init__(self, secrets: Any = None, *, timeout: float = 60.0, connect_timeout: float = 10.0) -> None:
        from gateway.dataplane.credentials import UpstreamCredentials

        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.credentials = UpstreamCredentials(secrets.credentials if secrets is not None else None, timeout=timeout)
        self._open: list[Any] = []
        self._pools: dict[int, Any] = {}  # id(client) -> its pool (HTTP)

    def client_for(self, server: ServerEntry) -> Any:
        from gateway.dataplane.channels import SseUpstream, WebSocketUpstream
        from gateway.dataplane.mcp_client import UpstreamClient
        from gateway.dataplane.stdio import StdioUpstream
        from gateway.dataplane.upstream import UpstreamPool

        credential = self.credentials.for_server(server)
        if server.transport_type == "stdio":
            client = StdioUpstream(server.endpoint_url, timeout=self.timeout)
        elif server.transport_type in ("sse", "websocket"):
            kind = SseUpstream if server.transport_type == "sse" else WebSocketUpstream
            client = kind(server.endpoint_url, timeout=self.timeout, connect_timeout=self.connect_timeout,
                          credential=credential)
        else:
            pool = UpstreamPool(server.endpoint_url, max_connections=4, connect_timeout=self.connect_timeout)
            client = UpstreamClient(pool, server.target, timeout=self.timeout, credential=credential)
            self._pools[id(client)] = pool
        self._open.append(client)
        return client

    async def release(self, client: Any) -> None:
        """Close one client (its process, connection or pool)."""
        if client in self._open:
            self._open.remove(client)
        pool = self._pools.pop(id(client), None)
        if pool is not None:
            await pool.close()
        elif hasattr(client, "close"):
            await client.close()

    async def close(self) -> None:
        """Close every client still open, and the credentials' token fetcher."""
        await asyncio.gather(*(self.release(c) for c in list(self._open)), return_exceptions=True)
        await self.credentials.close()
