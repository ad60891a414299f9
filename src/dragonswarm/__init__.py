"""Py Dragon Swarm: pool ordinary machines into one network for LLM inference."""

__version__ = "0.1.0"
