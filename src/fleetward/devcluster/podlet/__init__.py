"""The podlet: a node agent that runs Pods bound to its Node as local processes (SPEC §10)."""
