"""A scripted, OpenAI-compatible stand-in for a language model (`fleetward llm serve`).

It is a real HTTP server speaking the Chat Completions protocol (tool calls, structured output,
streaming, usage) whose answers come from scenario rules, not from a model; see
docs/llm-standin.md. Tests and the offline demo point OpenAI clients at it; nothing in the
runtime knows about it.
"""

from fleetward.llmstandin.recorder import fingerprint
from fleetward.llmstandin.scenario import Scenario, ScenarioError, load_scenarios, parse_scenario
from fleetward.llmstandin.server import StandinServer, serve

__all__ = ["Scenario", "ScenarioError", "StandinServer", "fingerprint", "load_scenarios", "parse_scenario", "serve"]
