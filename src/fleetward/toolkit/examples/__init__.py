"""Example tool services built on fleetward.toolkit (installed with the package so that a
Deployment can run them: `python -m fleetward.toolkit.examples.<name>`)."""
