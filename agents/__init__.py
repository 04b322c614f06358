"""kvshare.agents: see the README module map."""
