"""Why did a run's L-BFGS phase stop? Float32 against float64 at the run's last checkpoint.

Question: when L-BFGS ends early on a failed line search ("step tolerance", t = 0), is the
direction wrong (a gradient that does not match the loss, e.g. sketched activations) or is the
float32 loss too noisy to show the decrease that a correct direction gives?

From a run file's checkpoint (`pinnsketch solve ... --out RUN.h5`, or `pinn_suite.py --runs DIR`),
the network is rebuilt twice from the recorded options: with the run's storage in float32 (what
trained) and with `exact` storage in float64 (the reference). Measured there:

* the loss in both precisions, and the float32 (run's storage) and float32 `exact` gradients'
  relative error and cosine against the float64 gradient;
* the L-BFGS direction of the checkpoint's curvature history applied to the run's gradient: its
  slope by that gradient and by the float64 one;
* the relative loss change along that direction at steps t = 1 ... 1e-4, evaluated in float32 and in
  float64 (a float32 line search sees only the first row);
* with --continue N: N more L-BFGS iterations from the checkpoint (fresh history) in float32 and in
  float64 with the run's storage: iterations done before a stop, loss and relative L2.

    python benchmarks/lbfgs_stop.py /tmp/runs/burgers_exact_s1.h5 --continue 200 --out /tmp/stop.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

#: Steps along the L-BFGS direction at which the loss change is measured.
STEPS = (1.0, 0.1, 1e-2, 1e-3, 1e-4)


def _double(value):
    """Floating tensors of a (nested) state to float64."""
    if torch.is_tensor(value) and value.is_floating_point():
        return value.double()
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_double(v) for v in value)
    return value


def build(checkpoint: dict, storage, dtype: str):
    """The solver's run of the checkpoint's problem and options, at the checkpoint's state, on the CPU."""
    from pinnsketch import problems
    from pinnsketch.cli import solve_options_from_config
    from pinnsketch.data.bench import parse_storage
    from pinnsketch.pinn.solver import _check_options, _resolve, _Run

    config = checkpoint["config"]
    problem = problems.get(config["problem"])
    options = solve_options_from_config(config)
    if isinstance(storage, str) and ":" in storage:
        storage = parse_storage(storage, defaults={})
    options.update(storage=storage, dtype=dtype, device="cpu")
    resolved = _resolve(problem, options)
    _check_options(resolved)
    run = _Run(problem, resolved, storage, (), False)
    state = checkpoint if dtype == "float32" else dict(
        checkpoint, model=_double(checkpoint["model"]), points=_double(checkpoint["points"]),
        parameters=_double(checkpoint["parameters"]))
    run.state.load_state_dict(state)
    return run


def loss_and_gradient(run) -> tuple[float, torch.Tensor]:
    """The loss and its flat gradient (float64 copy) at the run's parameters; advances the storage once."""
    from pinnsketch.training.step import advance

    advance(run.network)
    for p in run.params:
        p.grad = None
    loss, _ = run._loss()
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in run.params]).double()


def loss_at(run, theta: torch.Tensor) -> float:
    """The loss with the parameters set to the flat vector theta."""
    with torch.no_grad():
        i = 0
        for p in run.params:
            p.copy_(theta[i:i + p.numel()].view_as(p).to(p.dtype))
            i += p.numel()
        return float(run._loss()[0])


def lbfgs_direction(state: dict, gradient: torch.Tensor) -> torch.Tensor:
    """-H g by the two-loop recursion over torch.optim.LBFGS' stored curvature pairs (old_dirs = y, old_stps = s)."""
    ys = [y.double() for y in state["old_dirs"]]
    ss = [s.double() for s in state["old_stps"]]
    rho = [1.0 / float(y @ s) for y, s in zip(ys, ss)]
    q, alpha = gradient.clone(), [0.0] * len(ys)
    for i in reversed(range(len(ys))):
        alpha[i] = rho[i] * float(ss[i] @ q)
        q -= alpha[i] * ys[i]
    r = q * float(state["H_diag"])
    for i in range(len(ys)):
        r += ss[i] * (alpha[i] - rho[i] * float(ys[i] @ r))
    return -r


def continue_lbfgs(run, iterations: int) -> dict:
    """Up to `iterations` more L-BFGS iterations (fresh history, the run's LBFGS options) as the solver runs them."""
    from pinnsketch.pinn.result import Evaluator, predict
    from pinnsketch.training.step import train_step

    lbfgs = run.o["lbfgs"]
    opt = lbfgs.build(run.params)
    done, start = 0, time.perf_counter()
    while done < iterations:
        step = min(lbfgs.max_iter, iterations - done)
        type(lbfgs).limit(opt, step, lbfgs.max_line_search)
        before = opt.state[run.params[0]].get("n_iter", 0)
        train_step(run.network, opt, run._loss)
        ran = opt.state[run.params[0]].get("n_iter", 0) - before
        done += ran
        if ran < step:
            break
    evaluator = Evaluator(run.problem, run.layout, run.o["eval_points"])
    with torch.no_grad():
        loss = float(run._loss()[0])
    l2 = evaluator.errors(predict(run.solution, run.problem, evaluator.x))[0] if evaluator.available else None
    return {"iterations": done, "stopped_early": done < iterations, "loss": loss, "l2_relative_error": l2,
            "seconds": time.perf_counter() - start}


def measure(path: str, iterations: int = 0) -> dict:
    from pinnsketch import load

    checkpoint = load(path).checkpoint()
    storage = checkpoint["config"]["storage"]
    ran, exact32, exact64 = build(checkpoint, storage, "float32"), build(checkpoint, "exact", "float32"), \
        build(checkpoint, "exact", "float64")
    theta = torch.cat([p.detach().reshape(-1) for p in exact64.params]).double()
    f32, g32 = loss_and_gradient(ran)
    _, g32_exact = loss_and_gradient(exact32)
    f64, g64 = loss_and_gradient(exact64)

    def versus(g):
        return {"relative_error": float((g - g64).norm() / g64.norm()), "cosine": float(g @ g64 / g.norm() / g64.norm())}

    out = {"run_file": path, "problem": checkpoint["config"]["problem"], "storage": storage,
           "step": checkpoint["step"], "phase": checkpoint["phase"],
           "lbfgs_stop": checkpoint["history"].get("lbfgs_stop"),
           "loss_float32": f32, "loss_float64": f64, "loss_relative_difference": (f32 - f64) / f64,
           "gradient_norm_float64": float(g64.norm()),
           "gradient_float32_run_storage": versus(g32), "gradient_float32_exact": versus(g32_exact)}
    state = (checkpoint.get("optimizer") or {}).get("state", {}).get(0, {})
    if checkpoint["phase"] == "lbfgs" and state.get("old_dirs"):
        d = lbfgs_direction(state, g32)
        f32_exact = loss_at(exact32, theta)
        out["direction"] = {
            "history": len(state["old_dirs"]), "slope_run_gradient": float(g32 @ d), "slope_float64": float(g64 @ d),
            "loss_change_float32": {str(t): (loss_at(exact32, theta + t * d) - f32_exact) / f32_exact for t in STEPS},
            "loss_change_float64": {str(t): (loss_at(exact64, theta + t * d) - f64) / f64 for t in STEPS},
        }
    if iterations:
        out["continued"] = {dtype: continue_lbfgs(build(checkpoint, storage, dtype), iterations)
                            for dtype in ("float32", "float64")}
    return out


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("run_file")
    cli.add_argument("--continue", dest="iterations", type=int, default=0, metavar="N",
                     help="also run N more L-BFGS iterations from the checkpoint in float32 and float64")
    cli.add_argument("--out", default=None, help="write the measurements as JSON here")
    opts = cli.parse_args(argv)
    if opts.iterations < 0:
        cli.error(f"--continue {opts.iterations} must be >= 0")
    from pinnsketch.data.bench import git_commit, jsonable

    result = {"command": "python benchmarks/lbfgs_stop.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": git_commit(), "torch": torch.__version__, **measure(opts.run_file, opts.iterations)}
    text = json.dumps(jsonable(result), indent=2, allow_nan=False)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
