"""kvshare.agents: the agent API for code without LangGraph (``Agent``, ``Session``) and
the reference teams (``kvshare.agents.teams``); see the README module map."""

from kvshare.agents.session import Agent, Session

__all__ = ["Agent", "Session"]
