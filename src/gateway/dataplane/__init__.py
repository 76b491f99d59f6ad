"""Data plane: the MCP endpoints, the request pipeline and the upstream transports."""
