"""Desired state: pure functions from spec + resolved references to manifests."""
