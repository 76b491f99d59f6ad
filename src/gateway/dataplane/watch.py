"""List-change notifications for endpoints where the gateway is the server: `/mcp` and the facade.

A client listens with `subscriptions/listen` (2026-07-28) or a GET event
stream (2025 era). What it hears is a change of what the gateway lists for
it: `notifications/tools/list_changed`, `.../prompts/...`,
`.../resources/list_changed`.

Where changes come from:
- the configuration: a server of the tenant added, removed or changed
  (every snapshot change triggers a check at once);
- the upstreams: each watched scope (a tenant's aggregate, or one server
  behind the facade) has its lists fetched again every `interval` seconds
  while anyone listens, and a change in any server's tools, prompts,
  resources or templates is a change of the aggregate. This catches an
  upstream that changed whether or not it announced it, in every era and
  transport, at the cost of one list call per server and kind per interval,
  shared by all listeners of the scope (what it fetches refreshes the
  aggregate's cache, so the refetch a notification prompts sees the change).

A scope nobody listens to is not fetched. A server that fails to answer
leaves its last known lists in place (an outage is not a change). A server
whose own lists changed is also told to `upstream_changed` (capability
discovery reads it again, registry/discovery.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from gateway.snapshot import ServerEntry, Snapshot

log = logging.getLogger("gateway.watch")

# kind of list -> (list method, the filter field of subscriptions/listen, the notification)
KINDS = {
    "tools": ("tools/list", "toolsListChanged", "notifications/tools/list_changed"),
    "prompts": ("prompts/list", "promptsListChanged", "notifications/prompts/list_changed"),
    "resources": ("resources/list", "resourcesListChanged", "notifications/resources/list_changed"),
}
# Templates are part of what resources/list_changed announces.
_FETCHED = {**{k: v[0] for k, v in KINDS.items()}, "resourceTemplates": "resources/templates/list"}
_ANNOUNCED_AS = {"tools": "tools", "prompts": "prompts", "resources": "resources", "resourceTemplates": "resources"}
# Pending notifications per listener; a listener this far behind has every kind pending anyway.
_MAX_PENDING = 16

Scope = tuple[uuid.UUID, "uuid.UUID | None"]  # (tenant, one server behind the facade, or None for /mcp)


class Listener:
    """One client's stream: the kinds it wants, and the notifications waiting to be written."""

    def __init__(self, kinds: frozenset[str]) -> None:
        self.kinds = kinds
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(_MAX_PENDING)

    def changed(self, kind: str) -> None:
        if kind in self.kinds and not self.queue.full():
            self.queue.put_nowait(kind)

    def end(self) -> None:
        """The gateway is closing the stream (shutdown)."""
        try:
            self.queue.put_nowait(None)
        except asyncio.QueueFull:
            pass


class Watcher:
    def __init__(self, aggregate: Any, store: Any, *, interval: float) -> None:
        # aggregate.server_list(server, kind, method, version) fetches (and caches) one list.
        self.aggregate = aggregate
        self.store = store
        self.interval = interval
        self._listeners: dict[Scope, set[Listener]] = {}
        self._digests: dict[Scope, dict[str, str]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        # Told of a server whose lists changed (registry/discovery.py discovers it again), and what each was.
        self.upstream_changed: list[Callable[[ServerEntry], None]] = []
        self._server_digests: dict[uuid.UUID, bytes] = {}

    @property
    def listening(self) -> int:
        return sum(len(ls) for ls in self._listeners.values())

    async def add(self, scope: Scope, listener: Listener) -> None:
        """Start telling `listener` about changes in `scope` (from what the lists are now)."""
        first = scope not in self._listeners
        self._listeners.setdefault(scope, set()).add(listener)
        if first:
            self._digests[scope] = await self._digest(scope, self.store.current)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def remove(self, scope: Scope, listener: Listener) -> None:
        listeners = self._listeners.get(scope)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._listeners[scope]
                self._digests.pop(scope, None)

    def on_snapshot(self, snapshot: Snapshot) -> None:
        """The configuration changed: check every scope now."""
        self._wake.set()

    def end_all(self) -> None:
        """Tell every listener's stream to end (shutdown)."""
        for listeners in self._listeners.values():
            for listener in listeners:
                listener.end()

    async def close(self) -> None:
        self.end_all()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while self._listeners:
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            snapshot = self.store.current
            for scope in list(self._listeners):
                try:
                    digests = await self._digest(scope, snapshot)
                except Exception:  # noqa: BLE001 - one scope's trouble must not stop the others
                    log.exception("could not check the lists of %s for changes", scope)
                    continue
                before = self._digests.get(scope)
                if before is None or scope not in self._listeners:
                    continue
                self._digests[scope] = digests
                for kind in KINDS:
                    if digests.get(kind) != before.get(kind):
                        for listener in list(self._listeners.get(scope, ())):
                            listener.changed(kind)

    async def _digest(self, scope: Scope, snapshot: Snapshot) -> dict[str, str]:
        tenant_id, server_id = scope
        servers = [s for s in snapshot.servers_of(tenant_id) if server_id is None or s.id == server_id]
        servers.sort(key=lambda s: s.name)
        previous = self._digests.get(scope, {})
        hashes = {kind: hashlib.blake2b(digest_size=16) for kind in KINDS}
        lists = await asyncio.gather(
            *(self._server_lists(server, snapshot.version) for server in servers)
        )
        self._note_server_changes(servers, lists)
        failed = False
        for server, fetched in zip(servers, lists):
            # Access rules decide what a listener may see of these lists: changing them changes the lists.
            rules = snapshot.access.by_server.get(server.id)
            if rules is not None:
                ids = orjson.dumps(sorted(str(r.rule.id) for r in rules.rules))
                for digest in hashes.values():
                    digest.update(ids)
            for fetched_kind, items in fetched.items():
                if items is None:
                    failed = True
                    continue
                hashes[_ANNOUNCED_AS[fetched_kind]].update(
                    orjson.dumps([server.name, fetched_kind, items], option=orjson.OPT_SORT_KEYS)
                )
        digests = {kind: h.hexdigest() for kind, h in hashes.items()}
        if failed and previous:
            # A server that did not answer: keep what was known rather than announce a change.
            return {kind: previous.get(kind, digest) for kind, digest in digests.items()}
        return digests

    def _note_server_changes(self, servers: list[ServerEntry], lists: list[dict[str, list | None]]) -> None:
        """Call `upstream_changed` for each server whose lists (all fetched) differ from what they were."""
        if not self.upstream_changed:
            return
        for server, fetched in zip(servers, lists):
            if any(items is None for items in fetched.values()):
                continue  # an outage is not a change
            digest = hashlib.blake2b(orjson.dumps(fetched, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()
            before = self._server_digests.get(server.id)
            self._server_digests[server.id] = digest
            if before is not None and before != digest:
                for callback in self.upstream_changed:
                    callback(server)

    async def _server_lists(self, server: ServerEntry, version: int) -> dict[str, list | None]:
        kinds = list(_FETCHED)
        results = await asyncio.gather(
            *(self.aggregate.server_list(server, kind, _FETCHED[kind], version, fresh=True) for kind in kinds)
        )
        return dict(zip(kinds, results))
