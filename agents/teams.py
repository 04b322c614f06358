"""Reference teams: who the agents are and what each one is told.

One definition, used by ``kvshare demo`` and ``kvshare bench --workload qa``; the workflows
differ only in how they lay the shared document out (``kvshare.demo``: document first;
``kvshare.bench.workloads.QAWorkload``: each agent's role first).
"""

from __future__ import annotations

QA_TEAM: tuple[tuple[str, str], ...] = (
    ("reader", "You are the reader. Quote the sentence of the document that answers the question."),
    (
        "answerer",
        "You are the answerer. Answer the question in a few words, using the "
        "document and the reader's quote.",
    ),
    (
        "critic",
        "You are the critic. Check the earlier answers against the document and say "
        "briefly whether they are right.",
    ),
    ("judge", "You are the judge. Reply with only the final answer, in a few words."),
)
"""(agent name, role instruction) of the four-agent question-answering team, in order."""
