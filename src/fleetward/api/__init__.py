"""The typed Fleetward API (group fleetward.dev): the single source of truth for CRDs,
runtime config and docs. Imports nothing else of Fleetward."""
