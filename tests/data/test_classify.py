"""Classifier training: every storage policy learns the digits; seeds, callbacks and errors behave."""

import pytest
import torch

from pinnsketch.data import load_digits
from pinnsketch.data.classify import ClassifierResult, evaluate, make_classifier, train_classifier
from pinnsketch.data.preprocess import Standardizer
from pinnsketch.nn import CNN, MLP, STORAGES
from pinnsketch.training import Callback

FAST = dict(epochs=3, batch_size=64, lr=5e-3, seed=0, progress=False)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.mark.parametrize("storage", list(STORAGES))
def test_every_policy_beats_chance_on_digits(digits, storage):
    model = make_classifier(digits, storage=storage, width=32, depth=2, seed=0)
    result = train_classifier(model, digits, **FAST)
    assert isinstance(result, ClassifierResult)
    # Chance is 10%; every policy, ema's mean-field gradient included, must be far above it.
    assert result.test_accuracy > 0.6, (storage, [h["test_accuracy"] for h in result.history])
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.steps == 3 * (1438 // 64) == len(result.step_saved_bytes)
    assert result.saved_bytes_peak == max(result.step_saved_bytes) > 0
    assert [entry["storage"] for entry in result.storage_report] == [storage] * 3


def test_same_seed_same_initial_weights_under_every_policy(digits):
    ref = make_classifier(digits, storage="exact", width=32, depth=2, seed=7)
    for storage in STORAGES:
        other = make_classifier(digits, storage=storage, width=32, depth=2, seed=7)
        for (name, p), (_, q) in zip(ref.named_parameters(), other.named_parameters()):
            assert torch.equal(p, q), (storage, name)
    different = make_classifier(digits, storage="exact", width=32, depth=2, seed=8)
    assert not torch.equal(next(ref.parameters()), next(different.parameters()))


def test_training_is_deterministic_on_cpu(digits):
    runs = [train_classifier(make_classifier(digits, storage="lowrank", width=32, depth=1, seed=1), digits,
                             epochs=2, batch_size=64, seed=3, progress=False) for _ in range(2)]
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(p, q)
    other = train_classifier(make_classifier(digits, storage="lowrank", width=32, depth=1, seed=1), digits,
                             epochs=2, batch_size=64, seed=4, progress=False)
    assert other.history[0]["loss"] != runs[0].history[0]["loss"]  # another seed shuffles differently


def test_exact_and_checkpoint_follow_the_same_trajectory(digits):
    # Both compute exact gradients: same init and batches must give the same weights,
    # while checkpoint keeps fewer bytes for backward.
    results = {s: train_classifier(make_classifier(digits, storage=s, width=32, depth=3, seed=0), digits,
                                   epochs=1, batch_size=64, seed=0, progress=False)
               for s in ("exact", "checkpoint")}
    for p, q in zip(results["exact"].model.parameters(), results["checkpoint"].model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert results["checkpoint"].saved_bytes_peak < results["exact"].saved_bytes_peak


def test_cnn_learns_digits_with_a_sketched_head(digits):
    model = make_classifier(digits, "cnn", storage="lowrank", seed=0, channels=(8, 16), hidden=32)
    assert isinstance(model, CNN)
    result = train_classifier(model, digits, **FAST)
    assert result.test_accuracy > 0.8
    assert [e["storage"] for e in result.storage_report] == ["lowrank", "lowrank"]


def test_evaluate_matches_a_direct_count(digits):
    model = make_classifier(digits, storage="exact", width=16, depth=1, seed=0)
    transform = Standardizer(digits, flatten=True)
    with torch.no_grad():
        pred = model(transform(digits.test_images)).argmax(1)
    expected = (pred == digits.test_labels).double().mean().item()
    assert evaluate(model, digits.test_images, digits.test_labels, transform, batch_size=50) == pytest.approx(expected)


def test_standardizer_centres_each_channel(digits):
    x = Standardizer(digits, flatten=False)(digits.train_images, torch.float64)
    assert x.shape == digits.train_images.shape
    assert x.mean().abs() < 1e-9 and (x.std() - 1).abs() < 1e-3
    assert Standardizer(digits, flatten=True)(digits.test_images[:5]).shape == (5, 64)


class Recorder(Callback):
    def __init__(self, stop_after=None):
        self.events, self.stop_after = [], stop_after

    def on_start(self, state):
        self.events.append(("start", state.step, state.phase))

    def on_step(self, state):
        assert all(p.grad is not None for p in state.model.parameters())
        self.events.append(("step", state.step, state.phase, dict(state.losses), state.saved_bytes_peak))
        if self.stop_after is not None and state.step >= self.stop_after:
            state.stop_training = True

    def on_end(self, state, result):
        self.events.append(("end", state.step, result.test_accuracy))


def test_callbacks_see_train_phase_and_can_stop(digits):
    rec = Recorder()
    result = train_classifier(make_classifier(digits, storage="projection", width=16, depth=1), digits,
                              epochs=1, batch_size=256, callbacks=[rec], progress=False)
    steps = [e for e in rec.events if e[0] == "step"]
    assert rec.events[0] == ("start", 0, "train") and rec.events[-1][0] == "end"
    assert [e[1] for e in steps] == list(range(1, result.steps + 1))
    assert all(e[2] == "train" and set(e[3]) == {"cross_entropy"} and e[4] > 0 for e in steps)
    stopper = Recorder(stop_after=2)
    stopped = train_classifier(make_classifier(digits, storage="exact", width=16, depth=1), digits,
                               epochs=3, batch_size=64, callbacks=[stopper], progress=False)
    assert stopped.steps == 2 and len(stopped.history) == 1


def test_bad_options_are_clear_errors(digits):
    model = make_classifier(digits, width=8, depth=1)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; choose one of adam, sgd"):
        train_classifier(model, digits, optimizer="rmsprop")
    with pytest.raises(ValueError, match="epochs=0 must be a positive integer"):
        train_classifier(model, digits, epochs=0)
    with pytest.raises(ValueError, match="batch_size=5000 exceeds the 1438 training samples"):
        train_classifier(model, digits, batch_size=5000)
    with pytest.raises(ValueError, match="unknown architecture 'rnn'; choose one of mlp, cnn"):
        make_classifier(digits, "rnn")
    with pytest.raises(ValueError, match="unknown storage policy 'svd'"):
        make_classifier(digits, storage="svd")
    assert isinstance(make_classifier(digits, storage=["exact", "lowrank"], depth=1), MLP)


def test_evaluation_leaves_the_storage_state_alone(digits):
    # Evaluation batches (other sizes, test data) must not reach the policies: ema's
    # persistent sketches would be reset or blended with test images.
    model = make_classifier(digits, storage="ema", width=32, depth=1, seed=0)
    train_classifier(model, digits, epochs=1, batch_size=64, progress=False)
    def ema_state(storage):
        state = storage.get_extra_state()["ema"]
        return len(state["resets"]), state["slots"]

    before = [ema_state(s) for s in model.storages]
    evaluate(model, digits.test_images, digits.test_labels, Standardizer(digits, flatten=True), batch_size=100)
    for (resets, slots), s in zip(before, model.storages):
        after_resets, after_slots = ema_state(s)
        assert after_resets == resets and after_slots.keys() == slots.keys()
        for key in slots:
            assert all(torch.equal(after_slots[key][n], slots[key][n]) for n in slots[key])


def test_run_file_and_gradient_monitor_as_callbacks(digits, tmp_path):
    from pinnsketch.io import RunWriter, load
    from pinnsketch.monitor import GradientMonitor

    monitor = GradientMonitor(rank=2, window=50)
    path = tmp_path / "digits.h5"
    result = train_classifier(make_classifier(digits, storage="projection", width=16, depth=1), digits,
                              epochs=1, batch_size=128, callbacks=[RunWriter(path, monitor=monitor)], progress=False)
    summary = load(path).summary()
    assert summary["kind"] == "classifier" and summary["problem"] == "digits" and summary["storage"] == "projection"
    assert summary["steps"] == result.steps == len(monitor)
    assert summary["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert summary["saved_bytes_peak"] == result.saved_bytes_peak


def test_lowrank_by_name_gets_the_mini_batch_noise_allowance():
    from pinnsketch.data import MINIBATCH_OPTIONS, minibatch_storage, parse_storage
    from pinnsketch.nn import LowRankStorage

    assert minibatch_storage("lowrank").noise_fraction == MINIBATCH_OPTIONS["lowrank"]["noise_fraction"]
    assert minibatch_storage("exact") == "exact"
    mixed = minibatch_storage(["exact", "lowrank"])
    assert mixed[0] == "exact" and isinstance(mixed[1], LowRankStorage)
    assert parse_storage("lowrank:rank=8").noise_fraction == 0.25
    assert parse_storage("lowrank:noise_fraction=none").noise_fraction is None
    custom = LowRankStorage(target=0.05)
    assert minibatch_storage(custom) is custom          # objects pass unchanged
