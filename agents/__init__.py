"""kvshare.agents: the agent API for code without LangGraph (``Agent``, ``Session``) and
the reference teams (``kvshare.agents.teams``); see the README module map and docs/development.md.

Wing: the applications (beside ``integrations``, ``bench``, ``explore``). May import:
``kvshare.engine`` and every wing below it, ``kvshare.integrations`` and ``kvshare.bench``.
"""

# Imported by a bare name from the repo root: yield to the installed package (_unshadow.py).
if __name__ != "kvshare.agents":
    import runpy

    _here = __path__[0]
    runpy.run_path(f"{_here}/../kvshare/_unshadow.py")["hand_over"](__name__, _here)
else:
    from kvshare.agents.session import Agent, Session

    __all__ = ["Agent", "Session"]
