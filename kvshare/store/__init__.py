"""kvshare.store — every KV container: the segment and the store contract (``contract``), the
segment store and its lookups (``segments``, ``radix``), memory tiers and the tiered store that
moves KV between them (``tiers``, ``tiered``, ``tier_book``, ``tier_moves``, ``uses``,
``trim``), and what KV on disk is (``disk``, ``disk_index``, ``segment_file``, ``seal``,
``identity``).

May import: the core, ``kvshare.kernels`` and ``kvshare.model``. The store never imports the
scheduler: what it needs of workflow order (a priority, the pinned set) it is handed as
callables taking plain values (``SegmentInfo``).
"""
