"""LangChain 1.x agent middleware composed from the Agent's spec, SOPs and Guardrails."""
