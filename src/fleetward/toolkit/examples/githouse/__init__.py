"""The GitHouse tool service: one HTTP service serving every tool the GitHouse agents of
examples/githouse/30-agents.yaml list, each call verified with fleetward.toolkit.

Run: python -m fleetward.toolkit.examples.githouse --help
"""
