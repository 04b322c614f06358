"""kvshare.integrations: LangChain (``ChatKVShare``) and LangGraph (``wrap``) on an Engine.

Wing: the applications. May import: ``kvshare.engine`` and every wing below it.
"""

# Imported by a bare name from the repo root: yield to the installed package (_unshadow.py).
if __name__ != "kvshare.integrations":
    import runpy

    _here = __path__[0]
    runpy.run_path(f"{_here}/../kvshare/_unshadow.py")["hand_over"](__name__, _here)
