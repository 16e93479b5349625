"""The local Kubernetes cluster and its services (SPEC §10): start, stop, connect."""
