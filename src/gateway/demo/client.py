"""Call a gateway endpoint with the official MCP SDK client, in either era.

`python -m gateway.demo.client <endpoint> <api_key> [--mode legacy|2026-07-28|auto]`
lists the tools and calls `echo`: the quickest proof that a key and a route work.
`gateway_client` is also what the tests use to talk to the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


@contextlib.asynccontextmanager
async def _bearer_transport(endpoint: str, api_key: str):
    # The SDK leaves a client it was given open, so this owns and closes it.
    http: httpx2.AsyncClient = create_mcp_http_client(headers={"Authorization": f"Bearer {api_key}"})
    async with http:
        async with streamable_http_client(endpoint, http_client=http) as streams:
            yield streams


def gateway_client(endpoint: str, api_key: str, *, mode: str = "auto", **options) -> Client:
    """An SDK `Client` that presents `api_key` as a bearer token on every request."""
    return Client(_bearer_transport(endpoint, api_key), mode=mode, **options)


async def _main(endpoint: str, api_key: str, mode: str) -> None:
    async with gateway_client(endpoint, api_key, mode=mode) as client:
        tools = await client.list_tools()
        print(f"protocol {client.protocol_version}; tools: {', '.join(t.name for t in tools.tools)}")
        result = await client.call_tool("echo", {"text": "hello through the gateway"})
        print(f"echo -> {result.content[0].text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("endpoint")
    parser.add_argument("api_key")
    parser.add_argument("--mode", default="auto", help="legacy, 2026-07-28 or auto (default)")
    args = parser.parse_args()
    asyncio.run(_main(args.endpoint, args.api_key, args.mode))


if __name__ == "__main__":
    main()
