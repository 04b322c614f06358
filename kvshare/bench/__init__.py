"""kvshare.bench: the benchmark harness, workloads and reports behind ``kvshare bench``.

Wing: the applications. May import: ``kvshare.engine`` and every wing below it,
``kvshare.agents``, ``kvshare.integrations`` and ``kvshare.explore``.
"""
