"""The LangGraph agent runtime that runs inside each agent's pods."""
