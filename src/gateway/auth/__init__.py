"""Identity: API keys, tokens, sessions, roles and access rules."""
