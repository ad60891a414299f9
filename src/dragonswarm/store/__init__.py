"""The orchestrator's embedded state (keys, nodes, usage): the only package that touches a database."""
