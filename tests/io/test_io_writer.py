"""RunWriter and save_result: every group written during a solve reads back as recorded."""

import json
import math

import h5py
import numpy as np
import pytest
import torch

from io_helpers import Parabola1D, solve_options, train_loop
from pinnsketch import pinn as ps
from pinnsketch.io import RunWriter, load, load_checkpoint, save_result
from pinnsketch.monitor import GradientMonitor


def test_root_attributes(recorded_run):
    path, result, _ = recorded_run
    run = load(path)
    assert run.schema_version == 2
    assert run.problem == "parabola1d" and run.storage == "exact" and run.seed == 3 and run.device == "cpu"
    assert run.completed and run.steps == 30 and run.attrs["kind"] == "pinn"
    assert run.attrs["torch_version"] == torch.__version__ and run.attrs["pinnsketch_version"]
    expected = {k: v for k, v in result.config.items() if k != "steps_done"}
    assert run.config == json.loads(json.dumps(expected))
    assert run.wall_time_s == pytest.approx(result.timing["total_s"])
    assert run.saved_bytes_peak == result.saved_bytes_peak
    assert run.l2_relative_error == pytest.approx(result.l2_relative_error, rel=1e-12)


def test_training_group_matches_history(recorded_run):
    path, result, _ = recorded_run
    run, h = load(path), result.history
    t = run.training
    assert t["step"].tolist() == h["step"]
    assert t["phase"].tolist() == h["phase"]
    np.testing.assert_array_equal(t["loss"], h["loss"])
    np.testing.assert_array_equal(t["lr"], h["lr"])
    for term, values in h["terms"].items():
        np.testing.assert_array_equal(run.losses[term], values)
    evaluated = ~np.isnan(t["l2_relative_error"])
    assert t["step"][evaluated].tolist() == h["eval"]["step"]
    np.testing.assert_array_equal(t["l2_relative_error"][evaluated], h["eval"]["l2_relative_error"])
    np.testing.assert_array_equal(t["l2_per_output/u"][evaluated], h["eval"]["per_field"]["u"])
    assert (t["saved_bytes_peak"][t["saved_bytes_peak"] >= 0] <= result.saved_bytes_peak).all()
    assert np.all(np.diff(t["wall_time_s"]) >= 0)


def test_sketch_group_holds_storage_reports(recorded_run):
    path, result, _ = recorded_run
    run = load(path)
    layers = run.sketch_layers
    assert sorted(layers) == [f"layer_{i}" for i in range(len(result.storage_report))]
    steps = run.sketch["step"]
    # a row whenever the report changes: exact storage reports the same bytes every step
    assert steps.tolist() == [1]
    for i, report in enumerate(result.storage_report):
        assert layers[f"layer_{i}"]["storage"][-1] == report["storage"]
        assert layers[f"layer_{i}"]["saved_bytes"][-1] == report["saved_bytes"]


def test_sketch_gets_a_row_whenever_a_lowrank_report_changes(tmp_path):
    path = tmp_path / "lowrank.h5"
    # 32 wide on 256 points: wide enough that lowrank compresses (8 wide would be stored exactly)
    ps.solve(Parabola1D(), **solve_options(storage="lowrank", lbfgs=ps.LBFGS(steps=0),
                                           network=ps.Network(width=32, depth=2),
                                           points=ps.Points(domain=256, boundary=2, initial=0)),
             callbacks=[RunWriter(path)])
    run = load(path)
    steps = run.sketch["step"]
    assert len(steps) > 12 and np.all(np.diff(steps) > 0)          # not just the evaluation steps
    ranks = run.sketch_layers["layer_1"]["rank"]
    assert np.all(ranks[np.isfinite(ranks)] >= 1) if ranks.dtype.kind == "f" else np.all(ranks >= 1)


def test_gradients_group_restores_the_monitor(recorded_run):
    path, _, monitor = recorded_run
    run = load(path)
    np.testing.assert_array_equal(run.gradient_steps, monitor.steps.numpy())
    for i, name in enumerate(monitor.layers):
        np.testing.assert_array_equal(run.gradient_norms[name], monitor.norms(i).numpy())
    back = run.monitor()
    for layer in monitor.layers:
        np.testing.assert_array_equal(back.gradients(layer).value, monitor.gradients(layer).value)
    mem = run.gradient_memory
    assert mem["monitor_bytes"] == monitor.nbytes and mem["full_history_bytes"] == monitor.full_history_bytes


def test_model_and_solution_groups(recorded_run):
    path, result, _ = recorded_run
    run = load(path)
    sol = run.solution
    np.testing.assert_array_equal(sol.x, result.evaluation["x"])
    np.testing.assert_array_equal(sol.prediction, result.evaluation["prediction"])
    np.testing.assert_array_equal(sol.reference, result.evaluation["reference"])
    np.testing.assert_allclose(sol.error, sol.prediction - sol.reference)
    assert sol.input_names == ["x"] and sol.output_names == ["u"]
    assert sol.l2_relative_error == pytest.approx(result.l2_relative_error, rel=1e-12)
    # The rebuilt network reproduces the stored prediction.
    assert type(run.model).__name__ == type(result.model).__name__
    np.testing.assert_allclose(run.predict(sol.x), sol.prediction, rtol=0, atol=1e-12)
    for key, value in result.model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(run.model_state[key], value)


def test_checkpoint_is_the_final_training_state(recorded_run):
    path, result, _ = recorded_run
    state = load_checkpoint(path)
    final = result.state.state_dict()
    assert state["step"] == 30 and state["phase"] == "lbfgs"
    assert state["history"]["loss"] == final["history"]["loss"]
    assert torch.equal(state["generator"], final["generator"])
    for key, value in final["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state["model"][key], value)
    assert load(path).checkpoint_step == 30


def test_datasets_are_chunked_compressed_and_resizable(recorded_run):
    path = recorded_run[0]
    with h5py.File(path, "r") as f:
        for name in ("training/loss", "training/step", "gradients/norms/blocks.0", "sketch/step"):
            ds = f[name]
            assert ds.chunks is not None and ds.compression == "gzip" and ds.maxshape == (None,)


def test_save_result_writes_a_complete_file(tmp_path):
    result = ps.solve(Parabola1D(), **solve_options(adam=ps.Adam(steps=6, lr=3e-2), lbfgs=ps.LBFGS(steps=2)))
    path = save_result(result, tmp_path / "saved.h5")
    run = load(path)
    assert run.completed and run.steps == result.history["step"][-1]
    assert run.training["step"].tolist() == result.history["step"]
    np.testing.assert_array_equal(run.training["loss"], result.history["loss"])
    np.testing.assert_array_equal(run.solution.prediction, result.evaluation["prediction"])
    assert run.checkpoint_step == result.state.step and run.gradient_norms == {}
    # the same status and L-BFGS stop as a file written while training
    assert run.summary()["status"] == "completed"
    assert run.summary()["lbfgs_stop"]["reason"] == result.history["lbfgs_stop"]["reason"] == "step budget"
    with pytest.raises(TypeError, match="RunWriter"):
        save_result(object(), tmp_path / "bad.h5")


def test_custom_loop_with_missing_values(tmp_path):
    path = tmp_path / "loop.h5"
    monitor = GradientMonitor(rank=2, window=16)
    train_loop([RunWriter(path, log_every=2, checkpoint_every=7, flush_every=3, monitor=monitor)], steps=30)
    run = load(path)
    assert run.attrs["kind"] == "custom" and run.problem == "regression"
    steps = run.training["step"]
    assert set(steps.tolist()) == set(range(2, 31, 2)) | {10, 30}
    l2 = run.training["l2_relative_error"]
    assert np.isnan(l2[steps % 10 != 0]).all() and l2[steps == 20][0] == pytest.approx(0.025)
    rank = run.sketch_layers["layer_1"]["rank"]
    assert rank.dtype.kind == "i" and rank[-1] == 5
    assert "rank" not in run.sketch_layers["layer_0"]          # always None: never a column
    assert run.gradient_steps.tolist() == list(range(1, 31))   # the monitor sees every step
    assert len(run.monitor().steps) == 30 and monitor.memory_report()["windows"] == 2
    assert run.checkpoint_step == 30
    with pytest.raises(ValueError, match="rebuild|construct"):
        run.model                                               # a plain nn.Sequential
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    run.load_weights(net)


def test_writer_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="mode='r'"):
        RunWriter(tmp_path / "a.h5", mode="r")
    with pytest.raises(ValueError, match="checkpoint_every=-1"):
        RunWriter(tmp_path / "a.h5", checkpoint_every=-1)
    with pytest.raises(ValueError, match="compression='zstd'"):
        RunWriter(tmp_path / "a.h5", compression="zstd")
    with pytest.raises(TypeError, match="GradientMonitor"):
        RunWriter(tmp_path / "a.h5", monitor=object())
    (tmp_path / "exists.h5").write_bytes(b"")
    with pytest.raises(FileExistsError, match="mode='x'"):
        train_loop([RunWriter(tmp_path / "exists.h5", mode="x")], steps=1)
    monitor = GradientMonitor()
    with pytest.raises(ValueError, match="also in callbacks"):
        ps.solve(Parabola1D(), **solve_options(adam=ps.Adam(steps=1), lbfgs=ps.LBFGS(steps=0)),
                 callbacks=[monitor, RunWriter(tmp_path / "b.h5", monitor=monitor)])


def test_lzf_and_uncompressed_files_read_back(tmp_path):
    for compression in ("lzf", None):
        path = tmp_path / f"{compression}.h5"
        train_loop([RunWriter(path, compression=compression, checkpoint_every=5)], steps=10)
        run = load(path)
        assert run.training["step"].tolist() == list(range(1, 11)) and math.isfinite(run.training["loss"][-1])


def test_classifier_training_is_recorded(tmp_path):
    from pinnsketch.data import load_dataset, make_classifier, train_classifier

    data = load_dataset("digits")
    model = make_classifier(data, "mlp", width=16, depth=1, seed=0)
    path = tmp_path / "digits.h5"
    monitor = GradientMonitor(rank=2, window=8, method="isvd", normalize=True)
    result = train_classifier(model, data, epochs=1, batch_size=256, seed=0, progress=False,
                              callbacks=[RunWriter(path, checkpoint_every=3, monitor=monitor)])
    run = load(path)
    assert run.attrs["kind"] == "classifier" and run.problem == "digits" and run.completed
    assert run.attrs["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert run.training["step"].tolist() == list(range(1, result.steps + 1))
    assert set(run.losses) == {"cross_entropy"} and run.solution is None
    assert run.storage == "exact" and run.saved_bytes_peak == result.saved_bytes_peak
    assert run.monitor().config["method"] == "isvd" and len(run.gradient_steps) == result.steps
    np.testing.assert_allclose(run.predict(np.zeros((2, 64))), model(torch.zeros(2, 64)).detach().numpy(),
                               atol=1e-6)


def test_pinnsketch_command_line(recorded_run, capsys, tmp_path):
    from pinnsketch.cli import main

    assert main(["inspect", "--json", str(recorded_run[0])]) == 0
    assert json.loads(capsys.readouterr().out)["problem"] == "parabola1d"
    assert main(["plot", str(recorded_run[0]), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "solution.png").exists()
    bad = tmp_path / "bad.h5"
    bad.write_text("not a run")
    assert main(["inspect", str(bad)]) == 2          # RunFileError is a ValueError: one line, status 2
    err = capsys.readouterr().err
    assert err.startswith("pinnsketch: error: ") and "not an HDF5 file" in err and "Traceback" not in err
