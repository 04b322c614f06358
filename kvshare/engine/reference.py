"""A call's full-prefill reference: observing (``shadow``) and, only when asked, teaching.

``shadow=True`` prefills the same prompt from scratch and reports the fidelity figures
(first-token KL, top-1 agreement, greedy match; design.md §5). It changes nothing learned:
anchor pool, gains, recompute ratio and stores are what they would be without it, so shadowed
figures describe what production calls get. ``teach=True`` lets that full prefill teach: the
true deviation of every relocated token goes into the scope's anchor pool, and the ``kvshare``
recompute ratio moves toward ``target_kl`` from the first-token KL. Teaching costs a full
prefill per call, which production calls do not pay.
"""

from __future__ import annotations

from typing import Any

from kvshare.engine.fidelity import adapt_ratio, compare, full_prefill
from kvshare.engine.learned import ScopeState
from kvshare.engine.pipeline import Parts, teach
from kvshare.engine.request import Request
from kvshare.engine.results import Prefilled, check_finite
from kvshare.engine.stats import GREEDY_CAP, kl_divergence


def reference(
    parts: Parts, req: Request, state: ScopeState, pre: Prefilled, tokens: list[int]
) -> dict[str, Any]:
    """The fidelity figures (``req.shadow``; else ``{}``), after teaching from the full
    prefill when ``req.teach``. Nothing runs for a call that asked for neither."""
    if not (req.shadow or req.teach):
        return {}
    model, ctx, eos = parts.model, parts.loaded.context_length, set(parts.eos_ids)
    full = full_prefill(model, req.prompt.ids, parts.empty())
    check_finite("the reference prefill", full[1])
    out: dict[str, Any] = {}
    if req.shadow:
        greedy_done = len(tokens) >= GREEDY_CAP or tokens[-1] in parts.eos_ids
        greedy = req.sampling.temperature == 0 and greedy_done
        out = compare(model, full, (pre.kv, pre.logits), tokens, greedy, eos, ctx)
    if req.teach:
        if state.pool is not None:
            teach(parts, req.scope, state.pool, pre.estimates, full[0], pre.asm.relocated)
        c = parts.config.select
        if parts.policy.adapts and c.adaptive and pre.asm.runs:
            kl = out["kl"] if out else kl_divergence(full[1], pre.logits)
            state.ratio = adapt_ratio(state.ratio, kl, c.target_kl, c.max_recompute_ratio)
    return out
