"""What discovery found, as the admin API shows it: a server's tools, resources, templates and prompts.

Also the one write on it: approving a tool's current definition (pinning,
registry/discovery.py). Every query runs in `service.scoped` with the actor's
tenant filter, like the other admin routes: a server outside the caller's
reach is "not found", and so is everything it offers.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.controlplane.service import Actor, Conflict, NotFound, bump_version, scoped
from gateway.db.tables import (
    mcp_servers,
    server_prompts,
    server_resource_templates,
    server_resources,
    server_tools,
    utcnow,
)
from gateway.registry.discovery import definition_hash

# Path segment -> (table, the columns shown)
KINDS: dict[str, tuple[sa.Table, tuple[str, ...]]] = {
    "tools": (server_tools, (
        "id", "server_id", "name", "title", "description", "input_schema", "output_schema", "annotations",
        "pin_status", "definition_hash", "approved_hash", "approved_definition", "changed_at", "success_count",
        "error_count", "avg_execution_time", "created_at", "updated_at",
    )),
    "resources": (server_resources, (
        "id", "server_id", "uri", "name", "title", "description", "mime_type", "annotations", "created_at",
        "updated_at",
    )),
    "resource-templates": (server_resource_templates, (
        "id", "server_id", "uri_template", "name", "title", "description", "mime_type", "annotations",
        "created_at", "updated_at",
    )),
    "prompts": (server_prompts, (
        "id", "server_id", "name", "title", "description", "arguments", "created_at", "updated_at",
    )),
}


async def _require_server(conn: AsyncConnection, actor: Actor, server_id: uuid.UUID) -> None:
    found = (
        await conn.execute(
            sa.select(mcp_servers.c.id).where(mcp_servers.c.id == server_id, actor.tenant_filter(mcp_servers))
        )
    ).first()
    if found is None:
        raise NotFound("server not found")  # also another tenant's


async def list_items(
    engine: AsyncEngine, actor: Actor, server_id: uuid.UUID, kind: str, *, limit: int, after: uuid.UUID | None,
    pin_status: str | None = None,
) -> list[dict[str, Any]]:
    """One page of what discovery stored for a server (`kind`: a key of KINDS), by id (keyset paging)."""
    table, columns = KINDS[kind]
    query = sa.select(table).where(table.c.server_id == server_id, actor.tenant_filter(table))
    if pin_status is not None:
        query = query.where(table.c.pin_status == pin_status)
    if after is not None:
        query = query.where(table.c.id > after)
    async with scoped(engine, actor) as conn:
        await _require_server(conn, actor, server_id)
        rows = (await conn.execute(query.order_by(table.c.id).limit(limit))).mappings().all()
    return [{c: row[c] for c in columns} for row in rows]


async def approve_tool(
    engine: AsyncEngine, actor: Actor, server_id: uuid.UUID, name: str, *, expected_hash: str | None = None
) -> dict[str, Any]:
    """Approve the tool's current definition: it becomes the pinned one, and the tool is no longer withheld.

    `expected_hash`: the definition hash the admin reviewed; if the tool has
    changed again since, nothing is approved (Conflict).
    """
    table, columns = KINDS["tools"]
    async with scoped(engine, actor) as conn:
        await _require_server(conn, actor, server_id)
        row = (
            await conn.execute(
                sa.select(table)
                .where(table.c.server_id == server_id, table.c.name == name, actor.tenant_filter(table))
                .with_for_update()
            )
        ).mappings().first()
        if row is None:
            raise NotFound(f"the server has no tool named '{name}' (as last discovered)")
        if expected_hash is not None and expected_hash != row["definition_hash"]:
            raise Conflict(
                f"tool '{name}' changed again since definition {expected_hash[:12]}: it is now "
                f"{row['definition_hash'][:12]}; review it and approve that one"
            )
        definition = {
            "name": row["name"], "title": row["title"], "description": row["description"],
            "inputSchema": row["input_schema"], "outputSchema": row["output_schema"],
            "annotations": row["annotations"],
        }
        # The stored columns hold the definition as discovered; its hash is what the next
        # discovery compares against, so that is what becomes approved.
        approved = row["definition_hash"] or definition_hash(definition)
        result = await conn.execute(
            sa.update(table).where(table.c.id == row["id"]).values(
                approved_hash=approved, approved_definition=definition, pin_status="approved",
                definition_hash=approved, updated_at=utcnow(),
            ).returning(*table.c)
        )
        row = result.mappings().one()
        await bump_version(conn)
    return {c: row[c] for c in columns}
