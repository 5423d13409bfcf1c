"""Network and training options on the `pinnsketch solve` command line: parsing, errors, run files."""

import dataclasses
import json

import pytest
import torch

import pinnsketch as ps
from pinnsketch import problems
from pinnsketch.cli import _solve_options, build_parser, main, solve_options_from_config
from pinnsketch.io import load
from pinn_helpers import run_cli

TINY = ["--steps", "4", "--lbfgs-steps", "2", "--points", "32", "--width", "8", "--depth", "1", "--storage",
        "exact", "--no-progress"]


def options(problem: str, *flags: str, recorded=None) -> dict:
    """The `solve` keyword arguments the flags give (no training)."""
    args = build_parser().parse_args(["solve", problem, *flags])
    return _solve_options(problems.get(problem), args, recorded)


@pytest.mark.parametrize("flags, key, expected", [
    (["--architecture", "pirate"], "network", ps.Network(architecture="pirate")),
    (["--activation", "sin"], "network", ps.Network(activation="sin")),
    (["--fourier", "features=128,scale=2"], "network", ps.Network(fourier=ps.Fourier(features=128, scale=2.0))),
    (["--fourier", "trainable=true"], "network", ps.Network(fourier=ps.Fourier(trainable=True))),
    (["--fourier"], "network", ps.Network(fourier=ps.Fourier())),
    (["--periodic", "x=2"], "network", ps.Network(periodic={"x": 2.0})),
    (["--periodic", "x=2,t=1", "--harmonics", "3"], "network", ps.Network(periodic={"x": 2.0, "t": 1.0}, harmonics=3)),
    (["--factorized"], "network", ps.Network(factorized=ps.Factorized())),
    (["--factorized", "mean=0.5,std=0"], "network", ps.Network(factorized=ps.Factorized(mean=0.5, std=0.0))),
    (["--balance"], "balance", ps.GradNormWeights()),
    (["--balance", "every=10,alpha=0.5"], "balance", ps.GradNormWeights(every=10, alpha=0.5)),
    (["--causal"], "causal", ps.Causal()),
    (["--causal", "chunks=8,tol=2"], "causal", ps.Causal(chunks=8, tol=2.0)),
    (["--optimizer", "soap"], "adam", ps.SOAP()),
    (["--optimizer", "SOAP:precondition_every=3,lr=0.01"], "adam", ps.SOAP(lr=0.01, precondition_every=3)),
    (["--schedule", "constant"], "adam", ps.Adam(schedule=ps.Constant())),
    (["--schedule", "cosine:final=0.1"], "adam", ps.Adam(schedule=ps.Cosine(final=0.1))),
    (["--schedule", "exponential:rate=0.5,every=100"], "adam", ps.Adam(schedule=ps.Exponential(0.5, 100))),
    (["--schedule", "warmup-exponential:warmup=10,decay_steps=50"], "adam",
     ps.Adam(schedule=ps.WarmupExponential(warmup=10, decay_steps=50))),
    (["--schedule", "warmup_exponential"], "adam", ps.Adam(schedule=ps.WarmupExponential())),
    (["--lbfgs", "history_size=10,max_iter=5,tolerance_change=1e-9"], "lbfgs",
     ps.LBFGS(history_size=10, max_iter=5, tolerance_change=1e-9)),
    (["--lbfgs", "steps=7", "--lbfgs-steps", "3"], "lbfgs", ps.LBFGS(steps=3)),
    (["--loss-weights", "pde=2,initial_u=10"], "loss_weights", {"pde": 2, "initial_u": 10}),
    (["--windows", "3"], "windows", ps.TimeWindows(3)),
    (["--chunk-bytes", "32MiB"], "network", ps.Network(chunk_bytes=32 * 2**20)),
    (["--chunk-bytes", "1048576"], "network", ps.Network(chunk_bytes=2**20)),
])
def test_each_flag_parses_into_its_option_object(flags, key, expected):
    got = options("heat", *flags)
    assert set(got) == {key} and got[key] == expected and type(got[key]) is type(expected)


def test_refine_changes_only_the_keys_it_names_over_the_problems_points():
    default = problems.get("allen_cahn").solver_defaults["points"]          # 4,000 fixed points
    got = options("allen_cahn", "--refine", "every=10,add=5")["points"]
    assert got == ps.Points(domain=default.domain, refine=ps.RAR(every=10, add=5))
    assert options("allen_cahn", "--refine", "none")["points"] == ps.Points(domain=default.domain, refine=None)
    assert options("heat", "--refine")["points"] == ps.Points(refine=ps.RAR())


def test_network_flags_keep_the_problems_network_and_the_recorded_options():
    # helmholtz defaults to a 64-wide sin network: --architecture changes the architecture only
    assert options("helmholtz", "--architecture", "modified")["network"] == ps.Network(
        width=64, depth=4, activation="sin", architecture="modified")
    recorded = {"network": ps.Network(width=16, fourier=ps.Fourier(features=32, scale=3.0), periodic={"x": 1.0},
                                      harmonics=2),
                "adam": ps.Adam(steps=9, lr=0.01, schedule=ps.Cosine(final=0.2)), "causal": ps.Causal(chunks=4)}
    got = options("heat", "--fourier", "scale=2", "--causal", "tol=3", "--optimizer", "soap", recorded=recorded)
    assert got["network"] == ps.Network(width=16, fourier=ps.Fourier(features=32, scale=2.0), periodic={"x": 1.0},
                                        harmonics=2)
    assert got["causal"] == ps.Causal(chunks=4, tol=3.0)
    # adam -> soap keeps steps, lr and schedule; betas become SOAP's
    assert got["adam"] == ps.SOAP(steps=9, lr=0.01, schedule=ps.Cosine(final=0.2))
    got = options("heat", "--periodic", "none", "--fourier", "none", "--causal", "none", recorded=recorded)
    assert got["network"] == ps.Network(width=16) and got["causal"] is None
    # --schedule over the same schedule changes only what it names; --steps/--lr apply after --optimizer
    got = options("heat", "--schedule", "cosine", "--optimizer", "soap:lr=0.5", "--lr", "0.1", recorded=recorded)
    assert got["adam"] == ps.SOAP(steps=9, lr=0.1, schedule=ps.Cosine(final=0.2))


@pytest.mark.parametrize("flags, match", [
    (["--fourier", "feature=3"], "--fourier 'feature=3': unknown key 'feature'; --fourier takes features, scale, "
                                 "trainable"),
    (["--fourier", "features=abc"], "features='abc' must be an int"),
    (["--fourier", "trainable=1"], "trainable=1 must be true or false"),
    (["--causal", "chunks=1"], "Causal chunks=1 must be an int >= 2"),
    (["--causal", "chunks"], "option 'chunks' in --causal 'chunks' is not KEY=VALUE; write e.g. --causal"),
    (["--balance", "every=2,every=3"], "'every' is given twice"),
    (["--lbfgs", "tolerance_grad=small"], "tolerance_grad='small' must be a number"),
    (["--lbfgs", "history=5"], "unknown key 'history'"),
    (["--refine", "add=5e2"], "add=500.0 must be an int"),
    (["--schedule", "linear"], "unknown schedule 'linear' in --schedule 'linear'; choose one of constant, cosine, "
                               "exponential, warmup-exponential"),
    (["--schedule", "constant:final=0.1"], "unknown key 'final'; --schedule takes no keys"),
    (["--optimizer", "sgd"], "unknown optimizer 'sgd' in --optimizer 'sgd'; choose one of adam, soap"),
    (["--optimizer", "soap:betas=0.9"], "unknown key 'betas'; --optimizer takes steps, lr, precondition_every"),
    (["--architecture", "resnet"], "invalid choice: 'resnet'"),
    (["--activation", "swish"], "swish"),
    (["--periodic", "x"], "input 'x' in --periodic 'x' is not KEY=VALUE; write e.g. --periodic x=2"),
    (["--harmonics", "3"], "harmonics=3 applies to the periodic embedding"),
    (["--chunk-bytes", "lots"], "--chunk-bytes 'lots' is not a positive byte count; write e.g. 33554432, 32MiB"),
    (["--chunk-bytes", "0"], "--chunk-bytes '0' is not a positive byte count"),
])
def test_bad_option_is_one_line_naming_it_and_exit_2(flags, match, capsys):
    assert run_cli(["solve", "heat", *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pinnsketch: error: ") and match in err, err


def test_bad_option_with_debug_raises(capsys):
    with pytest.raises(ValueError, match="unknown key 'feature'"):
        main(["solve", "heat", "--fourier", "feature=3", "--debug"])


def test_problem_name_read_as_an_optional_value_is_explained(capsys):
    assert run_cli(["solve", "--causal", "heat"]) == 2
    assert "--causal took 'heat' as its value; put the problem name first" in capsys.readouterr().err


def test_a_cli_run_records_the_options_and_its_config_reruns_to_the_same_options(tmp_path, capsys):
    first, again = tmp_path / "first.h5", tmp_path / "again.h5"
    flags = ["--architecture", "modified", "--fourier", "features=16,scale=1", "--causal", "chunks=4"]
    assert main(["solve", "heat", *TINY, *flags, "--out", str(first)]) == 0
    config = json.loads(load(first).attrs["config"])
    rebuilt = solve_options_from_config(config)
    given = options("heat", *TINY, *flags)
    assert rebuilt["network"] == given["network"] == ps.Network(width=8, depth=1, architecture="modified",
                                                                fourier=ps.Fourier(features=16, scale=1.0))
    assert rebuilt["causal"] == given["causal"] == ps.Causal(chunks=4)
    assert rebuilt["adam"] == given["adam"] and rebuilt["lbfgs"] == given["lbfgs"]
    assert len(load(first).training["loss"]) > 0
    # --from with one flag: the recorded options stay, the named key changes
    assert main(["solve", "--from", str(first), "--fourier", "scale=2", "--no-progress", "--out", str(again)]) == 0
    network = solve_options_from_config(json.loads(load(again).attrs["config"]))["network"]
    assert network == dataclasses.replace(given["network"], fourier=ps.Fourier(features=16, scale=2.0))
    capsys.readouterr()


def test_a_cli_run_with_the_training_options(tmp_path, capsys):
    path = tmp_path / "run.h5"
    assert main(["solve", "heat", *TINY, "--steps", "6", "--optimizer", "soap:precondition_every=2",
                 "--schedule", "warmup-exponential:warmup=2,decay_steps=2", "--lbfgs", "history_size=5,max_iter=3",
                 "--refine", "every=3,candidates=64,add=8,max_points=16", "--balance", "every=3",
                 "--periodic", "x=1", "--factorized", "--loss-weights", "initial_u=10",
                 "--out", str(path)]) == 0
    run_file = load(path)
    config = json.loads(run_file.attrs["config"])
    assert config["adam"]["optimizer"] == "soap" and config["adam"]["precondition_every"] == 2
    assert config["adam"]["schedule"] == {"name": "warmupexponential", "warmup": 2, "decay_rate": 0.9,
                                          "decay_steps": 2}
    assert config["lbfgs"]["history_size"] == 5 and config["lbfgs"]["max_iter"] == 3
    assert config["points"]["refine"] == {"every": 3, "candidates": 64, "add": 8, "max_points": 16}
    assert config["balance"] == {"name": "gradnorm", "every": 3, "alpha": 0.9}
    assert config["network"]["periodic"] == {"x": 1.0} and config["network"]["factorized"] == {"mean": 1.0,
                                                                                            "std": 0.1}
    assert config["loss_weights"] == {"initial_u": 10}
    rebuilt = solve_options_from_config(config)
    assert rebuilt["adam"] == ps.SOAP(steps=6, schedule=ps.WarmupExponential(warmup=2, decay_steps=2),
                                      precondition_every=2)
    assert "relative L2 error" in capsys.readouterr().out


def test_resume_refuses_the_new_option_flags(tmp_path, capsys):
    out = tmp_path / "done.h5"
    assert run_cli(["solve", "--resume", str(out), "--causal", "chunks=4"]) == 2
    assert "leave out --causal" in capsys.readouterr().err


def test_the_readme_example_command_parses_into_its_options():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Options on the command line"):]
    block = section[section.index("```bash\n") + 8:section.index("\n```", section.index("```bash"))]
    argv = block.replace("\\\n", " ").split()
    assert argv[:2] == ["pinnsketch", "solve"]
    args = build_parser().parse_args(argv[1:])
    got = _solve_options(problems.get(args.problem), args)
    assert got["network"] == ps.Network(width=32, depth=2, architecture="pirate", fourier=ps.Fourier(32, 2.0),
                                        periodic={"x": 2.0}, factorized=ps.Factorized())
    assert got["causal"] == ps.Causal(chunks=16) and got["points"] == ps.Points(domain=2000, refine=None)


def test_windows_flag_runs_marching_and_refuses_a_bad_count(tmp_path, capsys):
    out = tmp_path / "windows.h5"
    assert main(["solve", "heat", *TINY, "--windows", "2", "--out", str(out)]) == 0
    config = json.loads(load(out).attrs["config"])
    assert solve_options_from_config(config)["windows"] == ps.TimeWindows(2)
    assert main(["solve", "heat", *TINY, "--windows", "1"]) == 2
    assert "--windows 1" in capsys.readouterr().err


def test_chunk_bytes_reaches_every_block_and_the_run_file(tmp_path, capsys):
    out = tmp_path / "chunked.h5"
    assert main(["solve", "heat", *TINY, "--chunk-bytes", "4KiB", "--out", str(out)]) == 0
    network = solve_options_from_config(json.loads(load(out).attrs["config"]))["network"]
    assert network.chunk_bytes == 4096
    model = network.build(2, 1, "lowrank", torch.Generator().manual_seed(0), None, None,
                          input_names=("x", "t"))
    assert model.chunk_bytes == 4096 and all(b.chunk_bytes == 4096 for b in model.blocks)
    assert options("heat", "--chunk-bytes", "none", recorded={"network": network})["network"].chunk_bytes is None
    with pytest.raises(ValueError, match="Network chunk_bytes=-1 must be"):
        ps.Network(chunk_bytes=-1)
    capsys.readouterr()
