"""A small MCP server built on the official SDK, for `gateway demo` and the tests."""
