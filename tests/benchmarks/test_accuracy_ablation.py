"""benchmarks/accuracy_ablation.py --quick: a row runs its options and records what it ran."""

from __future__ import annotations

import json

from bench_helpers import load_benchmark


def load():
    return load_benchmark("accuracy_ablation")


def test_quick_rows_record_their_options(tmp_path):
    bench = load()
    out = tmp_path / "ablation.json"
    assert bench.main(["--problem", "burgers", "--rows", "all", "soap_only", "--cap", "1", "--quick",
                       "--out", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"all", "soap_only"}
    both = rows["all"]
    assert both["options"]["balance"]["name"] == "gradnorm" and both["options"]["causal"]["name"] == "causal"
    assert both["options"]["adam"]["schedule"]["name"] == "warmupexponential"
    assert 0 < both["l2_relative_error"] and 0 < both["causal_min_weight_last"] <= 1
    assert set(both["balance_weights_last"]) == {"pde"}      # burgers' conditions are hard constraints
    assert rows["soap_only"]["options"]["adam"]["optimizer"] == "soap" and rows["soap_only"]["stopped_by"] == "cap"
    assert rows["soap_only"]["lbfgs_steps"] == 0 and rows["soap_only"]["train_cpu_s"] >= 1
