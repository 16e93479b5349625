"""Kopf handlers, one module per kind. Each is thin: it picks the objects an event
concerns and calls the reconciler. `register(settings)` wires them with the settings'
intervals; `fleetward operator run` calls it before starting Kopf."""

from __future__ import annotations

from fleetward.operator.settings import OperatorSettings


def register(settings: OperatorSettings) -> None:
    from fleetward.operator.handlers import agent, deployment, killswitch, lifecycle, login, references

    login.register(settings)
    lifecycle.register(settings)
    agent.register(settings)
    references.register(settings)
    deployment.register(settings)
    killswitch.register(settings)
