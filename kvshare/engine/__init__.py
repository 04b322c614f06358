"""kvshare.engine — the request flow: ``Engine.chat`` (``engine``; built by ``wiring``, workflow
calls in ``workflow_calls``) validates a call (``request``), plans reuse (``policy``: exact
prefix, relocation, anchors), assembles and corrects KV (``relocate``, ``correct``,
``learned``), picks what to recompute (``select``), runs the partial prefill and decode
(``pipeline``, ``decode``) and reports what it did (``results``, ``stats``, ``fidelity``,
``profile``, ``turns``).

May import: every lower wing (core, ``kvshare.kernels``, ``kvshare.model``, ``kvshare.store``,
``kvshare.anchors``, ``kvshare.config``, ``kvshare.sched``); never ``integrations``, ``agents``,
``bench``, ``explore`` or the CLI.
"""
