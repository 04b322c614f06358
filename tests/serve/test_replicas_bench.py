"""``kvshare bench --workload replicas`` at a small size on a real local Ray (its own
instance: the bench starts and stops one)."""

from __future__ import annotations

import json

from kvshare.cli import main


def test_replicas_bench_runs_three_setups_and_affinity_keeps_workflows_whole(tiny_dirs, tmp_path):
    args = ["bench", "--workload", "replicas", "--model", str(tiny_dirs["llama"])]
    args += ["--modes", "kvshare", "--items", "4", "--agents", "3", "--prefix", "24"]
    args += ["--input", "96", "--output", "4", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "replicas.json").read_text())
    assert [(r["setup"], r["replicas"], r["router"]) for r in rows] == [
        ("one replica", 1, "default"), ("Ray default", 2, "default"),
        ("cache affinity", 2, "affinity"),
    ]  # fmt: skip
    assert all(r["calls"] == 12 and r["errors"] == 0 for r in rows)
    single, _, affinity = rows
    assert single["max_replicas_per_workflow"] == 1 and single["token_reuse"] > 0
    assert affinity["max_replicas_per_workflow"] == 1  # every workflow on one replica
    assert affinity["token_reuse"] > 0 and affinity["of_single"] > 0.5
