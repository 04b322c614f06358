"""kvshare.sched — everything about workflow order: step graphs read from LangGraph graphs, lists
or mappings (``graph``), the scheduler that turns hints into steps-until-next-use and eviction
priorities (``schedule``, each session's state in ``run``), prefetch ahead of the next agent
(``prefetch``), hints (``hints``) and per-workflow memory of static prompts (``workflow``).

May import: the core, ``kvshare.kernels``, ``kvshare.model``, ``kvshare.store``,
``kvshare.anchors`` and ``kvshare.config``. Reading a LangGraph graph needs no langgraph import
(its builder is read by attribute).
"""
