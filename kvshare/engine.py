"""The Engine: render -> plan -> assemble -> prefill -> decode -> remember, for every call."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from kvshare import model as model_loading
from kvshare.anchors import AnchorConfig, AnchorPool
from kvshare.config import ANCHORED_MODES, RELOCATING_MODES, EngineConfig
from kvshare.correct import RunEstimate, estimate_runs, learn, put_offsets
from kvshare.decode import (
    SamplingParams,
    check_sampling_args,
    cut_at_stop,
    decode,
    sample,
    stop_checker,
)
from kvshare.errors import ContextLengthError
from kvshare.kernels import KV, gradual_prefill, partial_prefill, splice
from kvshare.prompt import Prompt, render, token_hash
from kvshare.radix import RadixCache
from kvshare.relocate import Assembly, assemble, find_runs
from kvshare.select import choose
from kvshare.stats import (
    GREEDY_CAP,
    CallStats,
    SessionStats,
    aggregate,
    greedy_match,
    kl_divergence,
)
from kvshare.store import LRUSegmentStore, NullSegmentStore, SegmentStore, StoredSegment


class _Prefilled(NamedTuple):
    kv: KV
    logits: torch.Tensor
    done: torch.Tensor
    asm: Assembly
    estimates: list[RunEstimate]


@dataclass(frozen=True)
class ChatResult:
    """text: the reply (stop strings cut off); tokens: generated ids; stats: see CallStats."""

    text: str
    tokens: list[int]
    stats: CallStats


class Engine:
    """Runs agent chat calls on one model, reusing KV across calls, agents and sessions.

    Thread-safe: calls from several threads are serialised around the model.
    """

    def __init__(self, loaded: model_loading.LoadedModel, config: EngineConfig | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = config or EngineConfig()
        self.prefix_cache = RadixCache(self.config.prefix_cache_bytes)
        self.segments: SegmentStore = (
            LRUSegmentStore(self.config.segment_store_bytes)
            if self.config.store_segments
            else NullSegmentStore()
        )
        self.rotary = self.model.model.rotary_emb
        self.eos_ids = self._eos_ids()
        self._calls: list[CallStats] = []
        self._lock = threading.Lock()
        self._ratio = self.config.recompute_ratio
        self.anchors: AnchorPool | None = None
        if self.config.mode in ANCHORED_MODES:
            self.anchors = AnchorPool(
                AnchorConfig(
                    neighbours=self.config.neighbours,
                    budget_bytes=self.config.anchor_budget_bytes,
                    storage=self.config.anchor_storage,
                )
            )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        config: EngineConfig | None = None,
    ) -> Engine:
        """Load a local model (default: the embedded SmolLM2-135M-Instruct) into an Engine."""
        return cls(model_loading.load(name_or_path, device=device, dtype=dtype), config)

    def fork(self, config: EngineConfig | None = None, **options: Any) -> Engine:
        """A new Engine sharing this one's model, with empty stores and its own config."""
        return Engine(self.loaded, (config or self.config).with_options(**options))

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids.update(extra if isinstance(extra, list) else [extra])
        return {int(i) for i in ids if i is not None}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------- public calls
    def chat(
        self,
        messages: Any,
        agent: str | None = None,
        session: str | None = None,
        tenant: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        shadow: bool = False,
    ) -> ChatResult:
        """Answer ``messages`` (dicts ``{"role","content"}`` or LangChain messages).

        Raises PromptError, ConfigError or ContextLengthError before touching any store.
        """
        t0 = time.perf_counter()
        check_sampling_args(max_new_tokens, temperature, top_p, stop)
        prompt = render(self.tokenizer, messages)
        if len(prompt) >= self.loaded.context_length:
            raise ContextLengthError(
                f"prompt has {len(prompt)} tokens but the model's context is "
                f"{self.loaded.context_length}; shorten or drop earlier messages"
            )
        params = SamplingParams(float(temperature), float(top_p), seed)
        with self._lock:
            return self._call(
                prompt, t0, params, max_new_tokens, list(stop or []), shadow, agent, session, tenant
            )

    def stats(self, session: str | None = None, agent: str | None = None) -> SessionStats:
        """Aggregate CallStats over every call (or those of ``session`` / ``agent``)."""
        calls = [
            c
            for c in self._calls
            if (session is None or c.session == session) and (agent is None or c.agent == agent)
        ]
        return aggregate(calls)

    @property
    def calls(self) -> list[CallStats]:
        return list(self._calls)

    def reset(self) -> None:
        """Drop every stored KV and every recorded statistic."""
        with self._lock:
            self.prefix_cache.clear()
            self.segments.clear()
            if self.anchors is not None:
                self.anchors = AnchorPool(self.anchors.config)
            self._ratio = self.config.recompute_ratio
            self._calls.clear()

    # ---------------------------------------------------------------- pipeline
    def _scope(self, tenant: str | None, session: str | None) -> str:
        scope = self.config.share_scope
        if scope == "global":
            return "global"
        if scope == "tenant":
            return f"t:{tenant or ''}"
        return f"t:{tenant or ''}/s:{session if session is not None else uuid.uuid4()}"

    def _kv_dims(self) -> tuple[int, int, int]:
        cfg = self.model.config
        heads = cfg.num_key_value_heads or cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cfg.num_hidden_layers, heads, dim

    def _plan(self, scope: str, prompt: Prompt) -> Assembly:
        """Exact prefix, then (relocating modes) stored runs; tiny reuse is not worth it."""
        n, mode = len(prompt), self.config.mode
        dims, dtype, dev = self._kv_dims(), self.model.dtype, self.device
        if mode == "full":
            return assemble(n, None, [], dims, self.rotary, dtype, dev)
        hit, parts = self.prefix_cache.match(scope, prompt.ids[:-1])  # last token is computed
        runs = find_runs(prompt, hit, scope, self.segments) if mode in RELOCATING_MODES else []
        if hit + sum(r.length for r in runs) < max(1, self.config.min_reuse_share * n):
            return assemble(n, None, [], dims, self.rotary, dtype, dev)  # a sliver: recompute
        prefix_kv = splice(parts) if hit else None
        return assemble(n, prefix_kv, runs, dims, self.rotary, dtype, dev)

    def _prefill(self, asm: Assembly, prompt: Prompt, agent: str | None) -> _Prefilled:
        """Anchor offsets (anchor/kvshare), token choice, one partial prefill.

        The assembly's cache is this call's own: offsets and recomputed KV go in in place.
        """
        dev, n = self.device, len(prompt)
        ids, pos = torch.tensor(prompt.ids, device=dev), torch.arange(n, device=dev)
        ests: list[RunEstimate] = []
        if self.anchors is not None and asm.runs:
            ests = estimate_runs(
                self.anchors, asm, prompt, agent, self.rotary, self.config.feature_layer
            )
        plan = choose(self.config, asm, ests, self._ratio)
        narrow = put_offsets(self.config, self.anchors, asm, ests, plan, self.rotary)
        if narrow is not None:
            res = gradual_prefill(self.model, asm.cache, ids, pos, plan.sel, plan.checks, narrow)
        else:
            res = partial_prefill(
                self.model,
                asm.cache,
                ids,
                pos,
                plan.sel,
                max_masked_ratio=self.config.masked_prefill_max_ratio,
                inplace=True,
            )
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        done[res.recomputed] = True
        return _Prefilled(res.kv, res.logits[-1], done, asm, ests)

    def _full_prefill(self, prompt: Prompt) -> tuple[KV, torch.Tensor]:
        dev, n = self.device, len(prompt)
        ids, pos = torch.tensor(prompt.ids, device=dev), torch.arange(n, device=dev)
        res = partial_prefill(
            self.model,
            KV.empty(shape=self._kv_dims(), dtype=self.model.dtype, device=dev).padded(n),
            ids,
            pos,
            pos,
        )
        return res.kv, res.logits[-1]

    def _call(
        self,
        prompt: Prompt,
        t0: float,
        params: SamplingParams,
        max_new_tokens: int,
        stop: list[str],
        shadow: bool,
        agent: str | None,
        session: str | None,
        tenant: str | None,
    ) -> ChatResult:
        scope = self._scope(tenant, session)
        pre = self._prefill(self._plan(scope, prompt), prompt, agent)
        kv, logits, done, asm = pre.kv, pre.logits, pre.done, pre.asm
        gen = (
            torch.Generator(device="cpu").manual_seed(params.seed)
            if params.seed is not None
            else None
        )
        first = sample(logits.cpu(), params, gen)
        ttft = time.perf_counter() - t0
        if self.anchors is not None and pre.estimates:  # off the first-token path
            learn(self.anchors, pre.estimates, kv, done & asm.relocated, self.rotary)
        t1 = time.perf_counter()
        dec = decode(
            self.model,
            kv,
            first,
            max_new_tokens,
            params=params,
            eos_ids=self.eos_ids,
            context_length=self.loaded.context_length,
            generator=gen,
            should_stop=stop_checker(self.tokenizer, stop),
        )
        decode_s = time.perf_counter() - t1
        text = cut_at_stop(str(self.tokenizer.decode(dec.tokens, skip_special_tokens=True)), stop)
        self._remember(scope, prompt, dec.tokens, dec.kv, agent)
        fidelity = self._shadow(prompt, pre, dec.tokens, params) if shadow else {}
        relocated = int((asm.relocated & ~done).sum())
        stats = CallStats(
            mode=self.config.mode,
            prompt_tokens=len(prompt),
            prefix_hit_tokens=asm.prefix,
            relocated_tokens=relocated,
            recomputed_tokens=int((asm.relocated & done).sum()),
            computed_tokens=len(prompt) - asm.prefix - relocated,
            output_tokens=len(dec.tokens),
            ttft_s=ttft,
            decode_tok_s=(len(dec.tokens) - 1) / decode_s if decode_s > 0 else 0.0,
            finish_reason=dec.finish_reason,
            agent=agent,
            session=session,
            tenant=tenant,
            **fidelity,
        )
        self._calls.append(stats)
        return ChatResult(text, dec.tokens, stats)

    def _remember(
        self, scope: str, prompt: Prompt, tokens: list[int], kv: KV, agent: str | None
    ) -> None:
        """Keep what this call computed: radix prefix and the call's trace.

        kv: KV [L, H, S + R - 1, D] of the prompt and the reply's fed tokens, owned by this call
        (the trace keeps it without a copy). ``full`` mode is the no-reuse oracle and keeps
        nothing.
        """
        if self.config.mode == "full":
            return
        ids = tuple(prompt.ids) + tuple(tokens[:-1])  # the last token was never fed: no KV
        if self.config.mode in ("prefix", *RELOCATING_MODES):
            self.prefix_cache.insert(scope, ids, kv)
        if not self.config.store_segments or (scope, token_hash(ids)) in self.segments:
            return
        bounds = tuple((s.start, f"m{s.index}") for s in prompt.segments)
        bounds += ((prompt.tail.start, "reply"),)
        trace = StoredSegment(scope, token_hash(ids), ids, kv, "trace", "", agent, 0, "m0", bounds)
        self.segments.put(trace)

    def _shadow(
        self, prompt: Prompt, pre: _Prefilled, tokens: list[int], params: SamplingParams
    ) -> dict[str, Any]:
        """Fidelity of this call vs a full prefill of the same prompt (design.md section 5).

        The full prefill's KV also teaches the anchor pool every relocated token's true
        deviation, and steers ``kvshare``'s recompute ratio toward ``target_kl``.
        """
        full_kv, full_logits = self._full_prefill(prompt)
        ref = self._greedy(full_kv, full_logits)
        greedy_done = len(tokens) >= GREEDY_CAP or tokens[-1] in self.eos_ids
        ours = (
            tokens if params.temperature == 0 and greedy_done else self._greedy(pre.kv, pre.logits)
        )
        kl = kl_divergence(full_logits, pre.logits)
        if self.anchors is not None and pre.estimates:
            learn(self.anchors, pre.estimates, full_kv, pre.asm.relocated, self.rotary)
        if self.config.mode == "kvshare" and self.config.adaptive and pre.asm.runs:
            self._adapt(kl)
        return {
            "kl": kl,
            "top1_agree": bool(int(full_logits.argmax()) == int(pre.logits.argmax())),
            "greedy_match": greedy_match(ref, ours, self.eos_ids),
        }

    def _adapt(self, kl: float) -> None:
        """Move the recompute ratio toward ``target_kl``: up fast (x2 at most), down slowly.

        First-token KL is heavy-tailed, so a symmetric step would steer its geometric mean,
        not the mean we report, to the target; the slow way down keeps the mean in check.
        """
        step = (kl / self.config.target_kl) ** 0.5
        step = min(2.0, step) if step > 1 else max(0.85, step)
        self._ratio = min(self.config.max_recompute_ratio, max(0.01, self._ratio * step))

    def _greedy(self, kv: KV, logits: torch.Tensor) -> list[int]:
        return decode(
            self.model,
            kv,
            int(logits.argmax()),
            GREEDY_CAP,
            params=SamplingParams(),
            eos_ids=self.eos_ids,
            context_length=self.loaded.context_length,
        ).tokens
