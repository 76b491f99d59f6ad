"""Schema, migrations and database connections."""
