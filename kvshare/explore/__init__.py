"""kvshare.explore — what the notebooks show: reuse rates (``reuse``), fidelity against
the ``full`` oracle (``fidelity``), where time goes (``time``) and their plots (``plots``).

May import: ``kvshare.engine`` and everything below it, ``kvshare.bench`` and
``kvshare.agents`` (the workloads and teams it explores).
"""
