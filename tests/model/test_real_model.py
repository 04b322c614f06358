"""Integration on the real embedded model (SmolLM2-135M-Instruct, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from kvshare.kernels import KV, output_cache, partial_prefill

pytestmark = pytest.mark.model

DOC = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin "
    "encompasses seven million square kilometres, of which five and a half million are covered "
    "by the rainforest. The region includes territory belonging to nine nations."
)


def turns(answers: list[str]) -> list[dict[str, str]]:
    questions = ["How large is the basin?", "How many nations share it?", "Summarise in 5 words."]
    msgs = [{"role": "system", "content": "Answer from the document.\n" + DOC}]
    for i, q in enumerate(questions[: len(answers) + 1]):
        msgs.append({"role": "user", "content": q})
        if i < len(answers):
            msgs.append({"role": "assistant", "content": answers[i]})
    return msgs


def test_prefix_greedy_equals_full_over_a_conversation(real_engine):
    full, prefix = real_engine.fork(mode="full"), real_engine.fork(mode="prefix")
    answers: list[str] = []
    for _ in range(3):
        a = full.chat(turns(answers), max_new_tokens=24)
        b = prefix.chat(turns(answers), max_new_tokens=24, shadow=True)
        assert a.tokens == b.tokens and a.text == b.text
        assert b.stats.kl is not None and b.stats.kl < 1e-5 and b.stats.greedy_match == 32
        answers.append(a.text)
    hits = [c.prefix_hit_tokens for c in prefix.calls]
    assert hits[0] == 0 and all(h > 0 for h in hits[1:])
    # the previous reply's decode-phase KV is part of the reused prefix
    assert hits[2] > prefix.calls[1].prompt_tokens


def test_partial_prefill_is_exact_on_the_real_model(real_engine):
    model = real_engine.model
    ids = torch.tensor(real_engine.tokenizer(DOC)["input_ids"])
    n = ids.numel()
    pos = torch.arange(n)
    with torch.inference_mode():
        out = model(input_ids=ids[None], position_ids=pos[None], use_cache=True)

    kv = KV.from_cache(output_cache(out))
    zero = KV(torch.zeros_like(kv.keys), torch.zeros_like(kv.values))
    res = partial_prefill(model, zero, ids, pos, pos, max_masked_ratio=1.0, all_logits=True)
    assert res.masked and (res.logits - out.logits[0]).abs().max() <= 1e-4
    subset = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 5]
    res = partial_prefill(model, kv, ids, pos, subset)
    assert res.masked
    assert (res.kv.keys - kv.keys).abs().max() <= 1e-3
    assert (res.kv.values - kv.values).abs().max() <= 1e-3


def test_reply_quoted_inside_a_longer_message_is_relocated(real_engine):
    eng = real_engine.fork(mode="blend")
    first = eng.chat(turns([]), agent="answerer", max_new_tokens=40)
    msgs = [
        {"role": "system", "content": "You check answers. Be brief."},
        {"role": "user", "content": f"Another agent answered: {first.text} Is that right?"},
    ]
    r = eng.chat(msgs, agent="checker", max_new_tokens=8, shadow=True)
    reply_tokens = first.stats.output_tokens - 1
    assert r.stats.relocated_tokens + r.stats.recomputed_tokens >= reply_tokens - 4
    assert r.stats.top1_agree


def test_kvshare_team_relocates_within_fidelity_targets(real_engine):
    """A fixed small case: one NarrativeQA question through the 4-agent role-first team."""
    import statistics

    from kvshare.bench.corpus import NARRATIVEQA, qa_items
    from kvshare.bench.harness import run_workflow
    from kvshare.bench.workloads import QAWorkload

    eng = real_engine.fork(mode="kvshare")
    w = QAWorkload(qa_items(NARRATIVEQA)[:1], n_agents=4, output_len=32)
    calls = run_workflow(eng, w, True, "t", 0)[0]
    assert calls[-1].relocated_tokens > 0 and calls[-1].prefix_hit_tokens < 30
    assert statistics.fmean(c.kl or 0.0 for c in calls) <= 0.02
    assert all(c.top1_agree for c in calls)
    assert statistics.median(c.greedy_match or 0 for c in calls) == 32
    assert len(eng.anchor_pool()) > 0
