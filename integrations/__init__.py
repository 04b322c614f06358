"""kvshare.integrations: see the README module map."""
