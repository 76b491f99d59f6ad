"""Control plane: the admin API over the schema it owns."""
