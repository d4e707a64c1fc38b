"""tunepool control plane: REST API, database, CLI. Never imports torch."""
