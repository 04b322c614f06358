"""The request: one chat call validated at one boundary, before anything touches a store.

After :func:`make_request` returns, nothing in the call raises for user input; everything
that can be wrong with the arguments (messages, roles, content, sampling, scope ids, flags)
raises a named :class:`~kvshare.KVShareError` here, while every store, pool, counter and
ratio is still untouched.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from kvshare.config import EngineConfig
from kvshare.engine.decode import GREEDY_BELOW, SamplingParams
from kvshare.errors import ContextLengthError
from kvshare.model.prompt import Prompt, render
from kvshare.scope import Scope, check_id, scope_of
from kvshare.validate import check_bool, check_float, check_int, check_str_tuple

MAX_TEMPERATURE = 10.0  # documented cap; above ~2 sampling is close to uniform already
SEED_RANGE = (0, (1 << 64) - 1)  # what torch.Generator.manual_seed accepts
# Rendering toggles tokenizer state (special-token splitting) and Rust tokenizers refuse
# concurrent mutation ("Already borrowed"): one render at a time (about a millisecond each).
_RENDER_LOCK = threading.Lock()


@dataclass(frozen=True)
class Request:
    """One validated ``Engine.chat`` call.

    prompt: rendered ids and segments; scope: where its KV may be shared; stop: stop strings
    (a single str given by the caller is one stop string, never split into characters);
    t0: ``time.perf_counter()`` when the call began (TTFT counts from it); render_s: seconds
    spent rendering the prompt (waiting for the render lock included); shadow: measure
    fidelity against a full prefill, changing nothing; teach: let that full prefill teach
    the scope's anchor pool and recompute ratio (``kvshare.engine.reference``).
    """

    prompt: Prompt
    scope: Scope
    agent: str | None
    session: str | None
    tenant: str | None
    sampling: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...]
    shadow: bool
    t0: float
    render_s: float = 0.0
    teach: bool = False


def check_stop(stop: Any) -> tuple[str, ...]:
    """None, a str, or a list/tuple of non-empty str -> a tuple of stop strings.

    A str is one stop string (not its characters); dicts, sets and generators are rejected
    rather than guessed at.
    """
    return () if stop is None else check_str_tuple("stop", stop)


def check_sampling(temperature: Any, top_p: Any, seed: Any) -> SamplingParams:
    """temperature finite in [0, MAX_TEMPERATURE] (below ``GREEDY_BELOW``: 0, greedy); top_p
    in (0, 1]; seed an int in range."""
    temp = check_float("temperature", temperature, 0.0, MAX_TEMPERATURE)
    temp = 0.0 if temp < GREEDY_BELOW else temp
    p = check_float("top_p", top_p, 0.0, 1.0, open_lo=True)
    s = None if seed is None else check_int("seed", seed, *SEED_RANGE)
    return SamplingParams(temp, p, s)


def make_request(
    config: EngineConfig,
    tokenizer: Any,
    context_length: int,
    messages: Any,
    *,
    agent: Any = None,
    session: Any = None,
    tenant: Any = None,
    max_new_tokens: Any = 256,
    temperature: Any = 0.0,
    top_p: Any = 1.0,
    stop: Any = None,
    seed: Any = None,
    shadow: Any = False,
    teach: Any = False,
) -> Request:
    """Validate one call's arguments and render its prompt (see the module docstring).

    Raises ScopeError (ids), ConfigError (sampling, flags, max_new_tokens above
    ``config.max_new_tokens_cap``), PromptError (messages) or ContextLengthError.
    """
    t0 = time.perf_counter()
    tenant, session = check_id("tenant", tenant), check_id("session", session)
    scope = scope_of(config.share_scope, tenant, session)
    agent = check_id("agent", agent)
    cap = config.max_new_tokens_cap
    n_new = check_int("max_new_tokens", max_new_tokens, 1, cap)
    sampling = check_sampling(temperature, top_p, seed)
    stops = check_stop(stop)
    shadow, teach = check_bool("shadow", shadow), check_bool("teach", teach)
    t_render = time.perf_counter()
    with _RENDER_LOCK:
        prompt = render(tokenizer, messages, special_roles=config.special_token_roles)
    render_s = time.perf_counter() - t_render
    if len(prompt) >= context_length:
        raise ContextLengthError(
            f"prompt has {len(prompt)} tokens but the model's context is {context_length}; "
            f"shorten or drop earlier messages"
        )
    return Request(
        prompt, scope, agent, session, tenant, sampling, n_new, stops, shadow, t0, render_s, teach
    )
