"""`lowrank`'s weight-gradient error on the library's trained networks, step by step of its controller.

Question (DESIGN.md §3.4a): late in training the weight gradient is small while the activations are
not, so a fixed low-rank sketch can swamp it. How large is the error of the gradient that `lowrank`
delivers on a network that has finished training, and how many steps does its controller need to
reach it?

For each run file (a completed `pinnsketch solve` of a library problem): the problem at its defaults,
the run's seed (so the same base points; refinement anchors are not added within these steps), the
run's final weights. `exact` gives the reference gradient g; `lowrank` then runs `--steps` Adam steps,
and after each step a callback reads its gradient g_hat and puts the trained weights back, so every
step's gradient is taken at the same weights while the controller adapts its ranks and codes as in
training. Recorded per step: ||g_hat - g|| / ||g|| over all weights, the same per layer, and at the
end each block's mode, rank, bits and the bytes the blocks saved for backward in the last step, against
`exact`'s (the blocks' storage reports).

    python benchmarks/trained_gradients.py --runs RUN.h5 [RUN.h5 ...]

Writes results/trained_gradients.json (`--out`) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import pinnsketch as ps

HERE = Path(__file__).resolve().parent


class _Gradients(ps.Callback):
    """Callback: load `weights` before the first step; after each step keep p.grad and restore `weights`."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights, self.steps, self.reports = weights, [], []

    def on_start(self, state) -> None:
        self._restore(state.model)

    def on_step(self, state) -> None:
        self.steps.append({name: p.grad.detach().clone() for name, p in state.model.named_parameters()})
        report = getattr(state.model, "storage_report", None)  # state's copy is refreshed on metered steps only
        self.reports.append(report() if callable(report) else [])
        self._restore(state.model)

    @torch.no_grad()
    def _restore(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            p.copy_(self.weights[name])


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names) -> float:
    num = sum(float((a[n] - b[n]).double().pow(2).sum()) for n in names)
    den = sum(float(b[n].double().pow(2).sum()) for n in names)
    return (num / den) ** 0.5 if den > 0 else float("nan")


def _saved(report: list[dict]) -> int:
    return sum(int(r.get("saved_bytes") or 0) for r in report)


def gradients(problem, storage: str, seed: int, weights: dict, steps: int) -> _Gradients:
    """Run `steps` Adam steps of `storage` at `weights` (restored after every step); return the callback."""
    probe = _Gradients(weights)
    ps.solve(problem, storage=storage, seed=seed, adam=ps.Adam(steps=steps), lbfgs=ps.LBFGS(steps=0),
             eval_every=10**9, progress=False, callbacks=[probe])
    return probe


def measure(path: Path, steps: int) -> dict:
    """One record: the gradient error of `lowrank` on the final weights of the run in `path`."""
    from pinnsketch import problems

    run = ps.load(path)
    if run.problem not in problems.names():
        raise SystemExit(f"{path}: problem {run.problem!r} is not a library problem; pass run files of "
                         f"`pinnsketch solve PROBLEM` for one of {problems.names()}")
    problem = problems.get(run.problem)
    model_state = run.model_state
    weights = {k: torch.as_tensor(v) for k, v in model_state.items() if "storage" not in k and k != "structure"}
    exact = gradients(problem, "exact", run.seed, weights, 1)
    reference = exact.steps[0]
    lowrank = gradients(problem, "lowrank", run.seed, weights, steps)
    weight_names = [n for n in reference if n.endswith("weight")]
    per_step = [_relative(g, reference, list(reference)) for g in lowrank.steps]
    last = lowrank.steps[-1]
    blocks = [{k: r.get(k) for k in ("mode", "rank", "bits", "value_bits", "predicted_grad_error", "saved_bytes")}
              for r in lowrank.reports[-1]]
    return {
        "run_file": path.name, "problem": run.problem, "seed": run.seed, "run_storage": run.storage,
        "run_steps": run.steps, "run_l2_relative_error": run.l2_relative_error,
        "gradient_norm": sum(float(g.double().pow(2).sum()) for g in reference.values()) ** 0.5,
        "relative_error_per_step": per_step,
        "relative_error_final": per_step[-1],
        "relative_error_first": per_step[0],
        "relative_error_per_weight_final": {n: _relative(last, reference, [n]) for n in weight_names},
        # bytes the blocks kept for backward in the last step (their storage reports), both policies
        "saved_bytes_exact": _saved(exact.reports[-1]), "saved_bytes_lowrank": _saved(lowrank.reports[-1]),
        "blocks_final": blocks,
    }


def main(argv=None) -> int:
    from pinnsketch.data.bench import cpu_model, git_commit

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="run files of completed library solves")
    p.add_argument("--steps", type=int, default=30, help="lowrank steps at the trained weights")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results" / "trained_gradients.json")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: need at least 1")
    for path in args.runs:
        if not path.is_file():
            p.error(f"run file {path} does not exist; pass files written by `pinnsketch solve --out`")
    torch.set_num_threads(args.threads)
    records = [measure(path, args.steps) for path in args.runs]
    out = {"command": "python benchmarks/trained_gradients.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": git_commit(), "torch": torch.__version__, "cpu": cpu_model(),
           "threads": args.threads, "steps": args.steps, "records": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print("| problem | seed | weights from | run L2 | |g| | error at step 1 | error at step "
          f"{args.steps} | saved bytes / exact's |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        ratio = (r["saved_bytes_lowrank"] / r["saved_bytes_exact"]) if r["saved_bytes_exact"] else float("nan")
        print(f"| {r['problem']} | {r['seed']} | {r['run_storage']} | {r['run_l2_relative_error']:.2e} | "
              f"{r['gradient_norm']:.2e} | {r['relative_error_first']:.2e} | {r['relative_error_final']:.2e} | "
              f"{ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
