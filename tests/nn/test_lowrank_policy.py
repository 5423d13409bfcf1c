"""The lowrank policy: per-step seeds, exact low-rank streams, residual, audits, adaptation, fallback."""

import math

import pytest
import torch

from pinnsketch.nn import MLP, JetSpec, LowRankStorage

from nn_helpers import rel

SPEC = JetSpec(2, [(0,), (1,), (0, 0)])


def run(model, x, steps=1):
    """`steps` training-step evaluations (forward + backward + advance); returns the last weight grads."""
    for _ in range(steps):
        model.zero_grad()
        u = model.jet(x, SPEC).streams
        (u[2] + u[0] * u[1] - 0.05 * u[3]).pow(2).mean().backward()
        grads = torch.cat([b.weight.grad.flatten() for b in model.blocks])
        model.advance()
    return grads


@pytest.fixture
def x():
    return torch.rand(48, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1


def test_basis_is_fixed_within_a_step_and_refreshed_by_the_next(x):
    """L-BFGS re-evaluates the loss within one step: the gradients must agree bit for bit, also after
    the weights moved (the basis stays the step's). The next step takes its basis from a sample at
    the new weights: the same gradients as a fresh model at those weights."""
    def make():
        return MLP(2, 1, width=16, depth=2, dtype=torch.float64, seed=2,
                   storage=LowRankStorage(rank=2, residual=None, value_residual=None, adaptive=False))

    def grads(model):
        model.zero_grad()
        u = model.jet(x, SPEC).streams
        (u ** 2).sum().backward()
        return torch.cat([b.weight.grad.flatten() for b in model.blocks])

    model = make()
    first, again = grads(model), grads(model)
    assert torch.equal(first, again)
    with torch.no_grad():
        model.blocks[1].weight.mul_(1.5)
    within = grads(model)                         # moved weights, this step's basis
    model.advance()
    fresh_model = make()
    fresh_model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")},
                                strict=False)
    refreshed = grads(model)
    assert not torch.equal(refreshed, within)
    assert torch.equal(refreshed, grads(fresh_model))


def test_first_hidden_block_streams_are_low_rank(x):
    """Block 1 stores the first layer's output jet: value affine in (x, t) (rank <= 3), derivative
    streams constant across points (rank 1), second derivatives zero: rank 3 reconstructs it exactly."""
    exact = MLP(2, 1, width=10, depth=2, dtype=torch.float64, seed=4)
    sketched = MLP(2, 1, width=10, depth=2, dtype=torch.float64, seed=4,
                   storage=["exact", LowRankStorage(rank=3, residual=None, value_residual=None, adaptive=False),
                            "exact"])
    g_exact, g_sketch = run(exact, x), run(sketched, x)
    w1 = slice(2 * 10, 2 * 10 + 10 * 10)              # block 1's weight in the stacked gradient
    assert rel(g_sketch[w1], g_exact[w1]) < 1e-10
    assert sketched.storage_report()[1]["reconstruction_error"] < 1e-10


def test_narrow_input_block_is_stored_exactly(x):
    model = MLP(2, 1, width=32, depth=2, storage="lowrank", dtype=torch.float64)
    run(model, x)
    report = model.storage_report()
    assert report[0]["mode"] == "exact (narrow)"
    assert report[1]["mode"] == "lowrank+int4+int8" and report[1]["rank"] >= 1


def test_audits_calibrate_kappa(x):
    model = MLP(2, 1, width=12, depth=3, dtype=torch.float64,
                storage=LowRankStorage(rank=2, adaptive=True, audit_every=4, r_min=1, r_max=2))
    run(model, x, steps=6)
    hidden = model.storages[1:]
    assert all(len(s.audits) >= 1 for s in hidden)
    audit = hidden[0].audits[0]
    assert audit["step"] == 1 and audit["grad_error"] > 0 and audit["kappa"] > 0
    assert hidden[0].predicted_error() == pytest.approx(hidden[0].kappa * hidden[0].recon_error)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_audit_estimates_the_weight_gradient_error(activation, x):
    """The last block receives the exact output gradient, so its audit must match its true error."""
    width, depth = 16, 2
    exact = run(MLP(2, 1, width=width, depth=depth, activation=activation, dtype=torch.float64, seed=2), x)
    ratios = []
    for seed in range(3):
        policy = LowRankStorage(rank=2, adaptive=True, r_min=1, residual="int4", value_residual="int4",
                                audit_every=1, audit_size=32)
        model = MLP(2, 1, width=width, depth=depth, activation=activation, dtype=torch.float64, seed=2,
                    storage=policy)
        model.storages[-1].seed = seed            # other test matrices, same weights
        for _ in range(depth + 1):                # bootstrap: block `depth` is audited at step `depth`
            grads = run(model, x)
        last = model.storages[-1]
        true = rel(grads[-width:], exact[-width:])
        ratios.append(last.audits[-1]["grad_error"] / true)
    assert 0.6 < sum(ratios) / len(ratios) < 1.6, ratios


def test_tight_target_escalates_then_falls_back_to_exact(x):
    exact = run(MLP(2, 1, width=12, depth=3, dtype=torch.float64, seed=1), x)
    policy = LowRankStorage(target=1e-12, initial_rank=1, r_min=1, r_max=2, audit_every=1)
    model = MLP(2, 1, width=12, depth=3, dtype=torch.float64, seed=1, storage=policy)
    run(model, x, steps=12)
    events = [e["event"] for e in model.storages[2].events]
    assert events[0] == "bits_up" and "fallback_exact" in events
    assert model.storages[2].bits == 8 and model.storages[2].exact
    grads = run(model, x)
    assert model.storage_report()[2]["mode"] == "exact (fallback)"
    assert rel(grads, exact) < 1e-12        # weights never changed: every block exact again


def test_loose_target_shrinks_rank(x):
    policy = LowRankStorage(target=10.0, initial_rank=6, r_min=1, r_max=8, audit_every=1)
    model = MLP(2, 1, width=12, depth=2, dtype=torch.float64, storage=policy)
    run(model, x, steps=12)
    assert model.storages[1].rank < 6
    assert any(h["event"] == "shrink" for h in model.storages[1].history)


def test_state_dict_round_trip(x):
    kwargs = dict(width=12, depth=3, dtype=torch.float64, storage=LowRankStorage(audit_every=2), seed=3)
    model = MLP(2, 1, **kwargs)
    run(model, x, steps=4)
    clone = MLP(2, 1, **kwargs)
    clone.load_state_dict(model.state_dict())
    assert [s.step for s in clone.storages] == [s.step for s in model.storages]
    assert [s.kappa for s in clone.storages] == [s.kappa for s in model.storages]
    assert torch.equal(run(clone, x), run(model, x))


def test_history_records_rank_changes_and_events(x):
    policy = LowRankStorage(target=1e-12, initial_rank=1, r_min=1, r_max=2, audit_every=1)
    model = MLP(2, 1, width=12, depth=3, dtype=torch.float64, seed=1, storage=policy)
    run(model, x, steps=12)
    history = model.storages[2].history
    kinds = [h["event"] for h in history]
    assert any("grow" in k for k in kinds) and "bits_up" in kinds and "fallback_exact" in kinds
    assert [h["step"] for h in history] == sorted(h["step"] for h in history)


def test_calls_that_compression_would_not_shrink_are_stored_exactly(x):
    """Never worse than exact: a call with fewer rows than the rank (a small boundary set) costs more
    compressed (the basis alone is w x r per stream) and is stored exactly; the full set is compressed."""
    for policy in (LowRankStorage(rank=8, adaptive=False), LowRankStorage()):
        model = MLP(2, 1, width=12, depth=2, dtype=torch.float64, storage=policy)
        run(model, x[:5])                              # 5 rows < rank 8
        assert model.storage_report()[1]["mode"] == "exact (no saving)"
        run(model, x)                                  # the full set: the policy's rank
        assert model.storage_report()[1]["rank"] == model.storages[1].rank >= 8
        grads = run(model, x[:3])
        assert torch.isfinite(grads).all() and model.storage_report()[1]["mode"] == "exact (narrow)"


def test_never_stores_more_than_exact_on_a_narrow_network():
    """A 32-wide float64 network (the Poisson L-shape set-up's width) at full rank with int8 codes would
    need more bytes than z_prev: lowrank stores such blocks exactly, so its saved bytes never exceed exact's."""
    from pinnsketch.nn import MemoryMeter

    x = torch.rand(500, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def saved(storage):
        model = MLP(2, 1, width=32, depth=3, dtype=torch.float64, seed=1, storage=storage)
        peaks = []
        for _ in range(4):
            with MemoryMeter() as meter:
                run(model, x)
            peaks.append(meter.peak_bytes)
        return max(peaks), model

    exact, _ = saved("exact")
    full, model = saved(LowRankStorage(rank=32, residual="int8", adaptive=False))
    assert full <= exact
    assert {r["mode"] for r in model.storage_report()[1:]} == {"exact (no saving)"}
    compressed, model = saved(LowRankStorage(rank=4, adaptive=False))
    assert compressed < exact / 2


def _digits_batch(n=256, seed=0):
    from pinnsketch.data import load_digits

    data = load_digits()
    idx = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(seed))[:n]
    x = data.train_images[idx].flatten(1).float() / data.pixel_max
    return (x - x.mean(0)) / (x.std(0) + 0.1), data.train_labels[idx]


def _trained_digits_weights(steps=60):
    """A ReLU classifier 64-64x2-10 trained a little on the digits: real activations."""
    model = MLP(64, 10, width=64, depth=2, activation="relu", seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        xb, yb = _digits_batch(128, seed=step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def test_audit_estimate_matches_the_true_error_on_a_real_matrix():
    """On a trained digits classifier (float32: the audit sketch is kept in bfloat16), the audited
    last block's estimate of its weight-gradient error matches the true error against exact."""
    weights = _trained_digits_weights()
    xb, yb = _digits_batch(256, seed=99)

    def last_grad(model):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        return model.blocks[-1].weight.grad.clone()

    exact = MLP(64, 10, width=64, depth=2, activation="relu", seed=3)
    exact.load_state_dict(weights, strict=False)
    g_exact = last_grad(exact)
    ratios = []
    for seed in range(6):
        model = MLP(64, 10, width=64, depth=2, activation="relu", seed=3,
                    storage=LowRankStorage(rank=4, residual="int4", audit_every=1, audit_size=16))
        model.load_state_dict(weights, strict=False)
        for s in model.storages:
            s.seed = 100 + seed
        for _ in range(3):                       # bootstrap: block 2 is audited at step 2
            g = last_grad(model)
            model.advance()
        audit = model.storages[-1].audits[-1]
        assert audit["step"] == 2
        true = float(torch.linalg.norm(g - g_exact) / torch.linalg.norm(g_exact))
        assert true > 1e-3                       # a real error to measure
        ratios.append(audit["grad_error"] / true)
    assert 0.75 < sum(ratios) / len(ratios) < 1.3, ratios
    assert all(0.4 < r < 2.0 for r in ratios), ratios


def test_audit_measures_the_sampling_noise_and_mini_batch_target():
    """The audit's spread of per-sample gradients gives the batch's relative sampling noise
    (checked against per-sample gradients of exact storage); noise_fraction turns it into
    the effective target max(target, noise_fraction x noise)."""
    weights = _trained_digits_weights()
    xb, yb = _digits_batch(256, seed=98)
    exact = MLP(64, 10, width=64, depth=2, activation="relu", seed=3)
    exact.load_state_dict(weights, strict=False)
    per = []                                  # per-sample gradients of the last block
    for i in range(len(yb)):
        exact.zero_grad()
        torch.nn.functional.cross_entropy(exact(xb[i:i + 1]), yb[i:i + 1], reduction="sum").backward()
        per.append(exact.blocks[-1].weight.grad.clone())
    per = torch.stack(per)
    n, total = len(per), per.sum(0)
    sigma = math.sqrt(n / (n - 1) * (per.flatten(1).square().sum() - total.square().sum() / n)) / float(
        torch.linalg.norm(total))
    policy = LowRankStorage(rank=8, residual="int8", audit_every=1, noise_fraction=0.25)
    model = MLP(64, 10, width=64, depth=2, activation="relu", seed=3, storage=policy)
    model.load_state_dict(weights, strict=False)
    for _ in range(3):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        model.advance()
    last = model.storages[-1]
    assert last.noise == pytest.approx(sigma, rel=0.05)
    assert last.effective_target() == pytest.approx(max(last.target, 0.25 * last.noise))
    assert last.amplification >= 1.0
    assert LowRankStorage().effective_target() == LowRankStorage().target      # full batch: off


def test_derivative_path_control_tightens_jets_through_smooth_activations(x):
    """A jet through tanh: the block's reconstruction error also feeds the derivative path, so the
    controller holds it below target / (path_gain A), A the measured amplification; without path
    control it stops at a coarser reconstruction."""
    def settle(path_gain):
        model = MLP(2, 1, width=16, depth=3, dtype=torch.float64, seed=5,
                    storage=LowRankStorage(target=0.05, initial_rank=2, r_min=2, r_max=8, path_gain=path_gain))
        run(model, x, steps=40)
        return model.storages[2]

    with_path, without = settle(200.0), settle(None)
    assert without.path_target() is None
    assert with_path.path_target() == pytest.approx(
        with_path.effective_target() / (200.0 * with_path.amplification))
    assert with_path.recon_error < without.recon_error
    assert with_path.recon_error <= with_path.path_target() or with_path.exact
    assert (with_path.rank, with_path.bits) != (without.rank, without.bits)


def test_audit_steps_add_only_a_small_bfloat16_sketch():
    """An audit keeps Y_a (S, N, q) in bfloat16 on top of the compressed form, nothing exact:
    q = 8 values per point, 1/(2 w) of the audited block's exact bytes per column of q."""
    from pinnsketch.nn import MemoryMeter

    x, y = _digits_batch(128, seed=5)

    def peaks(storage):
        model = MLP(64, 10, width=128, depth=2, activation="relu", seed=1, storage=storage)
        out = []
        for _ in range(3):
            model.zero_grad()
            with MemoryMeter() as meter:
                torch.nn.functional.cross_entropy(model(x), y).backward()
            out.append(meter.peak_bytes)
            model.advance()
        return out

    exact = peaks("exact")[0]
    audited = peaks(LowRankStorage(rank=8, audit_every=1))          # block i audited at step i
    plain = peaks(LowRankStorage(rank=8, audit_every=0))
    extra = [a - p for a, p in zip(audited, plain)]
    assert all(0 < e <= 128 * 8 * 2 + 64 for e in extra), extra     # N q bfloat16 values (+ alignment)
    assert max(audited) < exact / 3


def test_model_reads_all_blocks_measurements_at_once(monkeypatch):
    """`MLP.advance` reads every lowrank block's pending measurements in one transfer; the controllers
    then decide exactly as when each block reads its own."""
    import pinnsketch.nn.models as models_module
    from pinnsketch.nn import MLP, JetSpec
    from pinnsketch.nn.storage import read_pending

    spec = JetSpec.from_names(["x", "t", "xx"], ["x", "t"])
    x = torch.rand(400, 2, generator=torch.Generator().manual_seed(0))

    def run():
        model = MLP(2, 1, width=32, depth=3, storage="lowrank", seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(6):
            model.advance()
            opt.zero_grad()
            jet = model.jet(x, spec)
            (jet.d(()) * jet.d((0,)) + jet.d((1,)) - 0.01 * jet.d((0, 0))).square().mean().backward()
            opt.step()
        return model

    taken = []
    real_take = LowRankStorage.take_readout
    monkeypatch.setattr(LowRankStorage, "take_readout", lambda self, v: taken.append(len(v)) or real_take(self, v))
    batched = run()
    assert len(taken) >= 2 * 6 - 2                      # every compressed block, nearly every step
    monkeypatch.setattr(models_module, "read_pending", lambda storages: None)
    alone = run()
    for a, b in zip(batched.storages, alone.storages):
        assert a.control.state_dict() == b.control.state_dict()
        assert a._readout is None                       # consumed by advance()
    read_pending(batched.storages)                      # the last step's measurements, read at once ...
    batched.advance()
    assert all(s._readout is None and s.pending_readout() is None for s in batched.storages)  # ... and used
