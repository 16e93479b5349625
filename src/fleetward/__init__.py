"""Fleetward: run fleets of LLM agents on Kubernetes under SOPs, guardrails and a kill switch."""

__version__ = "0.1.0"
