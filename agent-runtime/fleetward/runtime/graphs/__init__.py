"""The runtime's LangGraph graphs, one module per Agent role (SPEC §4)."""
