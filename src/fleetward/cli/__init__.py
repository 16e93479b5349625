"""The `fleetward` command line."""
