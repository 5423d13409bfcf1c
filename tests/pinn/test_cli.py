import pytest

from pinnsketch.cli import main
from pinn_helpers import run_cli

TINY = ["--steps", "4", "--lbfgs-steps", "2", "--points", "32", "--width", "8", "--depth", "1", "--storage",
        "exact", "--no-progress"]


def test_solve_writes_the_run_and_prints_the_error(tmp_path, capsys):
    out = tmp_path / "heat.h5"
    assert main(["solve", "heat", *TINY, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("relative L2 error: ") and "storage=exact" in lines[0]
    assert float(lines[0].split()[3]) > 0
    assert lines[1] == "L-BFGS stopped at step 6: step budget (all 2 iterations of LBFGS(steps=2) done)"
    assert lines[2] == f"saved to {out}" and out.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.h5"]        # no .partial, .tmp or lock left


def test_problems_lists_the_library(capsys):
    assert main(["problems"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "burgers" in names and names == sorted(names)


@pytest.mark.parametrize("argv, status, match", [
    (["solve", "no-such-problem"], 2, "unknown problem 'no-such-problem'; choose one of"),
    (["solve", "heat", "--steps", "-1"], 2, "steps=-1"),
    (["solve", "heat", "--dtype", "float16"], 2, "invalid choice"),
    (["solve"], 2, "required: problem"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_bad_input_is_one_line_and_nonzero(argv, status, match, capsys):
    assert run_cli(argv) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pinnsketch: error: ") and match in err


def test_debug_reraises(capsys):
    with pytest.raises(ValueError, match="unknown problem"):
        main(["solve", "nope", "--debug"])
