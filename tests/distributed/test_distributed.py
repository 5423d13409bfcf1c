"""Multi-process training (`pinnsketch.training.distributed`): two gloo ranks launched by torchrun.

Each launch starts real processes (`python -m torch.distributed.run`, one torch thread per
rank) and compares them with the single-process run of the same options in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import pinnsketch as ps
from pinnsketch import problems
from pinnsketch.training.distributed import Distributed, Group, agree
from pinnsketch.io import load
from pinnsketch.io.reader import load_checkpoint

HERE = Path(__file__).parent
DRIVER = HERE / "ddp_burgers.py"
_spec = importlib.util.spec_from_file_location("pinnsketch_tests_ddp_burgers", DRIVER)
driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(driver)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DDE_BACKEND="pytorch")
    env.setdefault("MPLCONFIGDIR", str(Path("/tmp") / f"mpl-{os.getuid()}"))
    return env


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]


def _launch(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(_torchrun(nproc, *args), env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        first = proc.stderr.find("Traceback")
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                    f"{proc.stderr[max(first, 0):][:6000]}")
    return proc


# --- the exact objective --------------------------------------------------------------------------------
STEPS, LBFGS_STEPS, REFINE_EVERY, RESAMPLE_EVERY = 20, 5, 8, 12


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Rank 0's and rank 1's records of the test's Burgers run under exact and lowrank storage."""
    out = tmp_path_factory.mktemp("ddp") / "burgers.json"
    _launch(2, str(DRIVER), "--storage", "exact,lowrank", "--steps", str(STEPS), "--lbfgs-steps", str(LBFGS_STEPS),
            "--refine-every", str(REFINE_EVERY), "--resample-every", str(RESAMPLE_EVERY), "--check-every", "1",
            "--json", str(out))
    return json.loads(out.read_text()), json.loads(Path(f"{out}.rank1").read_text())


def _single(storage: str) -> ps.Result:
    return ps.solve(problems.get("burgers"), **driver.options(storage, STEPS, LBFGS_STEPS, 256, RESAMPLE_EVERY,
                                                              REFINE_EVERY))


def test_exact_losses_match_the_single_process_run_per_step(two_ranks):
    rank0, rank1 = (r["exact"] for r in two_ranks)
    single = _single("exact")
    h = single.history
    assert rank0["phase"] == h["phase"] and rank0["step"] == h["step"]
    assert h["phase"].count("adam") == STEPS and h["phase"].count("lbfgs") == LBFGS_STEPS  # one iteration each
    relative = np.abs(np.array(rank0["loss"]) - h["loss"]) / np.abs(h["loss"])
    assert relative.max() < 1e-5, relative
    # resampling and refinement added the same points on every rank as in one process
    assert rank0["refine"] == rank1["refine"] == h["refine"]
    assert len(h["refine"]["step"]) == 2 and rank0["points"] == len(single.state.points.domain)
    # every rank took the same steps (check_every=1 compared the parameters after every step)
    assert rank0["params"] == rank1["params"]
    assert rank0["loss"] == rank1["loss"]
    assert rank0["l2"] == pytest.approx(single.l2_relative_error, rel=1e-4)


def test_lowrank_ranks_agree_and_stay_within_the_policy_error(two_ranks):
    rank0, rank1 = (r["lowrank"] for r in two_ranks)
    single = _single("lowrank")
    # the rank controllers read the same figures on every rank: the same ranks, the same parameters
    assert rank0["ranks"] == rank1["ranks"] and any(r is not None for r in rank0["ranks"])
    assert rank0["params"] == rank1["params"]
    # each rank compresses its own shard: the losses differ from one process by the compression
    # (measured 2e-6 relative over these 25 steps), far inside the policy's 1e-2 gradient target
    relative = np.abs(np.array(rank0["loss"]) - single.history["loss"]) / np.abs(single.history["loss"])
    assert relative.max() < 1e-3, relative
    assert rank0["l2"] <= 1.2 * single.l2_relative_error
    # memory per rank, and the run's figure is the largest
    info = rank0["distributed"]
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert len(info["saved_bytes_peak_per_rank"]) == 2 and all(v > 0 for v in info["saved_bytes_peak_per_rank"])
    assert rank0["saved_bytes_peak"] == max(info["saved_bytes_peak_per_rank"])


# --- the command line: rank 0 writes; a killed rank ends the job; resume on another count ---------------
def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _worker(agent: int, rank: int) -> int | None:
    """The pid of the worker of `rank` under the torchrun agent `agent` (from its environment)."""
    for child in _children(agent):
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return child
    return None


@pytest.mark.slow  # three launches and a solve: ~75 s on a loaded 2-core machine
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc")
def test_cli_killed_rank_ends_the_job_and_the_checkpoint_resumes(tmp_path):
    path = tmp_path / "run.h5"
    log = tmp_path / "stderr.txt"
    common = ["--no-progress", "--dist-timeout", "30"]
    command = _torchrun(2, "-m", "pinnsketch", "solve", "burgers", "--storage", "exact", "--steps", "400",
                        "--lbfgs-steps", "0", "--points", "256", "--width", "16", "--depth", "2",
                        "--eval-every", "100000", "--checkpoint-every", "5", *common, "--out", str(path))
    with open(log, "w") as err:
        agent = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 600
        while not (path.exists() and (load(path).checkpoint_step or 0) >= 10):
            assert agent.poll() is None, f"the job ended early:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no checkpoint at step 10:\n{log.read_text()[-4000:]}"
            time.sleep(0.05)
        victim = _worker(agent.pid, 1)
        assert victim is not None, "rank 1's process not found"
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        agent.wait(timeout=120)
        ended = time.monotonic() - killed
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    text = log.read_text()
    assert agent.returncode != 0
    assert "Signal 9 (SIGKILL)" in text, text[-4000:]          # torchrun names the dead rank
    assert ended < 30, ended                                     # within the stated 30 s timeout
    # the last checkpoint stays valid
    run = load(path)
    step = run.checkpoint_step
    assert step is not None and 10 <= step < 400 and not run.completed
    state = load_checkpoint(path)
    assert state["step"] == step
    assert len(state["points"]["base"]) == 256        # the global point set, not a rank's shard
    config = json.loads(run.attrs["config"])
    assert config["distributed"]["world_size"] == 2

    # another number of ranks: the checkpoint holds the global state, so one process continues it
    from pinnsketch.cli import solve_options_from_config

    options = solve_options_from_config(config)
    options["adam"] = ps.Adam(**{**config["adam"], "schedule": options["adam"].schedule, "steps": step + 5,
                                 "betas": tuple(config["adam"]["betas"])})
    alone = ps.solve(problems.get("burgers"), resume=state, progress=False, **options)
    assert alone.history["step"][-1] == step + 5

    # the same number of ranks: --resume finishes the run in the same file
    proc = _launch(2, "-m", "pinnsketch", "solve", "--resume", str(path), *common)
    assert proc.stdout.count("relative L2 error") == 1
    run = load(path)
    assert run.completed and run.steps == 400
    assert run.training["step"].tolist() == list(range(1, 401))


def test_cli_two_ranks_write_one_file(tmp_path):
    path = tmp_path / "run.h5"
    proc = _launch(2, "-m", "pinnsketch", "solve", "burgers", "--storage", "lowrank", "--steps", "12",
                   "--lbfgs-steps", "3", "--checkpoint-every", "4", "--points", "256", "--width", "16", "--depth", "2",
                   "--no-progress", "--dist-check-every", "5", "--out", str(path))
    assert proc.stdout.count("relative L2 error") == 1          # only rank 0 reports
    assert "2 ranks (gloo); step peak memory per rank" in proc.stdout
    run = load(path)
    assert run.completed and run.steps >= 13
    assert json.loads(run.attrs["config"])["distributed"]["world_size"] == 2
    assert not list(tmp_path.glob("*.partial"))


def test_two_ranks_go_on_in_float64_together(tmp_path):
    # tolerance_change=1e-2 stops float32 L-BFGS within a few iterations; the ranks must switch alike
    # (--dist-check-every 1 compares their parameters after every step) and the file records the switch
    path = tmp_path / "run.h5"
    proc = _launch(2, "-m", "pinnsketch", "solve", "burgers", "--storage", "lowrank", "--steps", "12",
                   "--lbfgs", "steps=60,tolerance_change=1e-2", "--points", "256", "--width", "16", "--depth", "2",
                   "--no-progress", "--dist-check-every", "1", "--out", str(path))
    assert proc.stdout.count("L-BFGS continued in float64 from step") == 1
    run = load(path)
    assert run.completed and len(run.attrs["lbfgs_float64_from"]) == 1
    assert "(in float64 from step" in run.attrs["lbfgs_stop_detail"]


# --- pieces in one process ------------------------------------------------------------------------------
def test_distributed_options_are_checked():
    with pytest.raises(ValueError, match="timeout_s"):
        Distributed(timeout_s=0)
    with pytest.raises(ValueError, match="check_every"):
        Distributed(check_every=-1)
    with pytest.raises(ValueError, match="backend"):
        Distributed(backend="mpi")
    with pytest.raises(TypeError, match="distributed="):
        ps.solve(problems.get("burgers"), distributed="yes", **driver.options("exact", 1, 0))


def test_forcing_distributed_without_a_launcher_says_how_to_launch(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        ps.solve(problems.get("burgers"), distributed=True, **driver.options("exact", 1, 0))


def test_distributed_options_in_one_process_run_alone():
    result = ps.solve(problems.get("burgers"), distributed=ps.Distributed(check_every=1),
                      **driver.options("exact", 2, 0, points=64))
    assert "distributed" not in result.config and len(result.history["loss"]) == 2


def test_agree_is_the_identity_in_one_process():
    assert agree([1.0, None, 3.0], lowest=[False, False, True]) == [1.0, None, 3.0]


def test_shards_cover_every_set_once_and_keep_periodic_pairs(monkeypatch):
    """shard_sets over all ranks: each row once (a small set whole on every rank), shares summing to 1."""

    class FakeGroup(Group):
        def __init__(self, rank, world):
            self.rank, self.world_size = rank, world

    rng = np.random.default_rng(0)
    interior, small = rng.random((11, 2)), rng.random((2, 2))
    lower = rng.random((5, 2))
    pairs = np.concatenate([lower, lower + 10])
    normals = rng.random((2, 2))
    seen, shares = [[], [], []], np.zeros(3)
    for rank in range(3):
        parts, extras, share = FakeGroup(rank, 3).shard_sets([interior, small, pairs],
                                                             [{"normal": normals}, {}], [False, False, True])
        seen[0].append(parts[0])
        seen[2].append(parts[2])
        assert parts[1] is small and extras[0]["normal"] is normals     # 2 points < 3 ranks: whole
        half = len(parts[2]) // 2
        np.testing.assert_array_equal(parts[2][half:], parts[2][:half] + 10)   # pairs stay together
        shares += share
    np.testing.assert_allclose(shares, 1.0)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen[0]), axis=0), np.sort(interior, axis=0))
    assert sum(len(p) for p in seen[2]) == len(pairs)


def test_bench_under_torchrun_shards_each_epoch_with_a_distributed_sampler(tmp_path):
    out = tmp_path / "bench.json"
    proc = _launch(2, "-m", "pinnsketch", "bench", "digits", "--storage", "lowrank", "--epochs", "2",
                   "--no-progress", "--json", str(out))
    assert proc.stdout.count("| digits") == 2                   # rank 0 prints the table (exact, lowrank)
    records = json.loads(out.read_text())["records"]
    for record in records:
        assert record["world_size"] == 2 and record["batch_size"] == 64      # the global batch
        per_rank = record["saved_bytes_peak_per_rank"]
        assert len(per_rank) == 2 and record["saved_bytes_peak"] == max(per_rank)
        # each rank's batch is half the global one: measured 83.6% in one process at 2 epochs
        assert record["test_accuracy"] > 0.75
        assert len(record["history"]) == 2


def test_global_batch_must_split_evenly_over_the_ranks():
    from pinnsketch.data.classify import _train

    class FakeGroup:
        world_size, device = 3, torch.device("cpu")

    with pytest.raises(ValueError, match="divisible by the 3 ranks"):
        _train(None, None, FakeGroup(), epochs=1, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0,
               seed=0, device=torch.device("cpu"), callbacks=(), progress=False, eval_batch_size=10,
               drop_last=True)
