"""GradientMonitor on synthetic gradient trajectories with known structure, and on a real model."""

import math

import pytest
import torch

from pinnsketch.monitor import GradientMonitor


def _trajectory(steps, params, rank, noise=0.0, seed=0, dtype=torch.float64):
    """G (steps, params) = smooth low-rank trajectory (+ noise): rows are per-step gradients."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(params, rank, generator=gen, dtype=dtype)).Q
    t = torch.linspace(0, 1, steps, dtype=dtype)[:, None]
    coeff = torch.cat([torch.cos((k + 1) * math.pi * t) * 3.0 ** -k for k in range(rank)], dim=1) + 0.2
    g = coeff @ basis.mT
    return g + noise * torch.randn(steps, params, generator=gen, dtype=dtype), basis


def _record(g, **options):
    param = torch.nn.Parameter(torch.zeros(g.shape[1], dtype=g.dtype))
    monitor = GradientMonitor({"w": param}, **options)
    for t, row in enumerate(g):
        param.grad = row.clone()
        monitor.update(step=10 + 2 * t)
    return monitor


@pytest.mark.parametrize("method", ["three_sketch", "isvd"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("window", [64, 25])
def test_exactly_low_rank_history_is_recovered(method, normalize, window):
    g, basis = _trajectory(64, 300, rank=3)
    monitor = _record(g, rank=3, window=window, method=method, normalize=normalize, dtype=torch.float64)
    est = monitor.gradients("w")
    torch.testing.assert_close(est.value, g, atol=1e-9, rtol=1e-9)
    assert float(est.error.max()) < 1e-9
    one = monitor.gradient(10 + 2 * 17, "w")
    torch.testing.assert_close(one.value, g[17], atol=1e-9, rtol=0)
    norms = monitor.reconstructed_norms(0)
    torch.testing.assert_close(norms.value, g.norm(dim=1), atol=1e-9, rtol=0)
    torch.testing.assert_close(monitor.norms("w"), g.norm(dim=1))
    cos = monitor.cosines("w")
    true = torch.nn.functional.cosine_similarity(g[:-1], g[1:], dim=1)
    torch.testing.assert_close(cos.value, true, atol=1e-9, rtol=0)
    sub = monitor.subspace("w")
    assert sub.basis.shape == (300, 3) and sub.relative_error < 1e-9
    # The leading subspace is the span of the true basis.
    torch.testing.assert_close(torch.linalg.svdvals(basis.mT @ sub.basis), torch.ones(3, dtype=torch.float64))
    assert torch.all(sub.singular_values[:-1] >= sub.singular_values[1:])


@pytest.mark.parametrize("method", ["three_sketch", "isvd"])
def test_noisy_history_error_estimates_track_true_errors(method):
    g, _ = _trajectory(200, 500, rank=4, noise=0.002)
    monitor = _record(g, rank=4, window=200, method=method, error_size=20, dtype=torch.float64)
    est = monitor.gradients("w")
    true = (est.value - g).norm(dim=1)
    # A flat noise tail costs the three-sketch a small factor over the best rank-4 error (about 0.05).
    assert float((true / g.norm(dim=1)).median()) < 0.3
    ratio = est.error / true
    assert 0.6 < float(ratio.median()) < 1.4
    norms = monitor.reconstructed_norms("w")
    assert torch.all((norms.value - g.norm(dim=1)).abs() <= 3 * norms.error)
    cos = monitor.cosines("w")
    true_cos = torch.nn.functional.cosine_similarity(g[:-1], g[1:], dim=1)
    assert float(((cos.value - true_cos).abs() / cos.error).median()) < 1.0
    sub = monitor.subspace("w", rank=2)
    rel = float((est.value - g).norm() / g.norm())
    assert sub.relative_error == pytest.approx(rel, rel=0.5)


def test_isvd_is_near_the_best_approximation_of_its_rank():
    g, _ = _trajectory(200, 400, rank=6, noise=0.002)
    monitor = _record(g, rank=4, window=200, method="isvd", normalize=False, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    best = float(((u[:, :4] * s[:4]) @ vh[:4] - g).norm() / g.norm())
    got = float((monitor.gradients("w").value - g).norm() / g.norm())
    assert got < 1.05 * best
    sketch = _record(g, rank=4, window=200, method="three_sketch", k=4, dtype=torch.float64)   # same memory
    assert got < float((sketch.gradients("w").value - g).norm() / g.norm())
    report = monitor.memory_report()
    assert report["layers"][0]["k"] == 4 and report["layers"][0]["s"] is None
    assert report["monitor_bytes"] == 8 * (400 * 4 + 4 + 200 * 4 + 10 * 200) + 200 * 16
    with pytest.raises(ValueError, match="leave k and s unset"):
        GradientMonitor(method="isvd", k=5)


def test_memory_report():
    g, _ = _trajectory(100, 1000, rank=2)
    monitor = _record(g.float(), rank=2, window=100)
    report = monitor.memory_report()
    k, s, q, p, t = 5, 11, 10, 1000, 100
    sketch = 4 * (p * k + k * t + s * s + q * t)
    assert report["monitor_bytes"] == monitor.nbytes == sketch + t * (8 + 8)
    assert report["full_history_bytes"] == t * p * 4
    assert report["memory_reduction"] == pytest.approx(1 - monitor.nbytes / (t * p * 4))
    assert report["layers"] == [{"layer": "w", "params": 1000, "rank": 2, "k": 5, "s": 11, "step_sketch": 0}]
    assert report["step_sketch_bytes"] == report["step_sketch_bytes_per_step"] == 0


def test_model_layers_callback_use_and_state_round_trip():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    monitor = GradientMonitor(rank=2, window=8, seed=5)

    class State:
        step = 0

    state = State()
    state.model = model
    monitor.on_start(state)
    assert monitor.layers == ["0", "2"] and monitor.layer_sizes == [80, 51]
    x = torch.randn(32, 4)
    grads = []
    for step in range(1, 13):
        model.zero_grad()
        model(x).pow(2).mean().backward()
        grads.append(torch.cat([model[2].weight.grad.flatten(), model[2].bias.grad]))
        state.step = step
        monitor.on_step(state)
    assert len(monitor) == 12 and monitor.memory_report()["windows"] == 2
    torch.testing.assert_close(monitor.norms("2").float(), torch.stack(grads).norm(dim=1))
    with pytest.raises(ValueError, match="not after the last recorded step 12"):
        monitor.on_step(state)
    back = GradientMonitor.from_state_dict(monitor.state_dict())
    torch.testing.assert_close(back.gradients("0").value, monitor.gradients("0").value)
    torch.testing.assert_close(back.cosines(1).value, monitor.cosines(1).value, equal_nan=True)
    with pytest.raises(RuntimeError, match="no parameters"):
        back.update()
    # Continuing a restored monitor equals never having stopped.
    resumed = GradientMonitor(model, rank=2, window=8, seed=5)
    resumed.load_state_dict(monitor.state_dict())
    for m in (monitor, resumed):
        m.update(step=13)
    torch.testing.assert_close(resumed.gradients("2").value, monitor.gradients("2").value)
    with pytest.raises(ValueError, match="configuration"):
        GradientMonitor(model, rank=3, window=8, seed=5).load_state_dict(monitor.state_dict())


def test_isvd_state_round_trip_continues_identically():
    g, _ = _trajectory(40, 120, rank=3, noise=0.01)
    first = _record(g[:25], rank=3, window=16, method="isvd")
    again = GradientMonitor({"w": torch.nn.Parameter(torch.zeros(120, dtype=g.dtype))}, rank=3, window=16,
                            method="isvd")
    again.load_state_dict(first.state_dict())
    whole = _record(g, rank=3, window=16, method="isvd")
    param = again._params[0][0]
    for t in range(25, 40):
        param.grad = g[t].clone()
        again.update(step=10 + 2 * t)
    torch.testing.assert_close(again.gradients("w").value, whole.gradients("w").value)


def test_queries_and_options_are_checked():
    g, _ = _trajectory(10, 20, rank=1)
    monitor = _record(g, rank=1, window=10)
    with pytest.raises(KeyError, match="step 11 was not recorded"):
        monitor.gradient(11, "w")
    with pytest.raises(KeyError, match="no layer named 'v'"):
        monitor.norms("v")
    with pytest.raises(IndexError, match="layer=3"):
        monitor.norms(3)
    with pytest.raises(ValueError, match="rank=5"):
        monitor.subspace("w", rank=5)
    for bad in (dict(rank=0), dict(window=-1), dict(sizing="big"), dict(operator="dense"),
                dict(dtype=torch.float16), dict(method="svd"), dict(rank=3, k=2), dict(k=9, s=5)):
        with pytest.raises(ValueError):
            GradientMonitor(**bad)
    with pytest.raises(TypeError, match="params must be"):
        GradientMonitor(3.0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradientMonitor(torch.nn.Tanh())
    empty = GradientMonitor({"w": torch.nn.Parameter(torch.zeros(3))})
    assert empty.norms().shape == (0, 1) and empty.cosines(0).value.numel() == 0
    empty.update()                       # no gradient yet: recorded as zero
    assert float(empty.norms("w")[0]) == 0.0 and empty.steps.tolist() == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_monitor_on_cuda():
    g, _ = _trajectory(30, 100, rank=2, dtype=torch.float32)
    param = torch.nn.Parameter(torch.zeros(100, device="cuda"))
    monitor = GradientMonitor({"w": param}, rank=2, window=30, step_sketch=16)
    for row in g.cuda():
        param.grad = row.clone()
        monitor.update()
    torch.testing.assert_close(monitor.gradients("w").value.float(), g, atol=1e-3, rtol=1e-3)
    assert monitor.step_sketch("w").shape == (30, 16) and torch.isfinite(monitor.cosines("w").value).all()
    back = GradientMonitor.from_state_dict(monitor.state_dict())             # on the CPU
    torch.testing.assert_close(back.sketched_norms("w").value, monitor.sketched_norms("w").value)


def test_configurations_saved_before_newer_options_still_load():
    g, _ = _trajectory(12, 30, rank=2)
    monitor = _record(g, rank=2, window=12, normalize=False)
    state = monitor.state_dict()
    for key in ("method", "k", "s", "step_sketch", "step_operator"):   # options older run files do not record
        del state["config"][key]
    back = GradientMonitor.from_state_dict(state)
    assert back.config == monitor.config
    torch.testing.assert_close(back.gradients("w").value, monitor.gradients("w").value)


# -- step sketch ---------------------------------------------------------------------------------
def _full_rank_history(steps=240, params=3000, seed=1):
    """Mini-batch-like history far from low rank: a fixed mean direction plus noise correlated from one
    step to the next (AR(1), coefficient 0.8), so consecutive cosines (about 0.87) are mostly in the
    noise that no low-rank fit captures."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(params, generator=gen)
    noise = [torch.randn(params, generator=gen)]
    for _ in range(steps - 1):
        noise.append(0.8 * noise[-1] + 0.6 * torch.randn(params, generator=gen))
    scale = torch.linspace(2.0, 0.5, steps)[:, None]
    return scale * (0.7 * mean + torch.stack(noise))


@pytest.mark.parametrize("operator", ["srft", "gaussian"])
def test_step_sketch_estimates_norms_cosines_and_inner_products_of_a_full_rank_history(operator):
    g = _full_rank_history()
    small = g[:, :40]                                    # a layer smaller than m: kept exactly
    params = {"w": torch.nn.Parameter(torch.zeros(g.shape[1])), "b": torch.nn.Parameter(torch.zeros(40))}
    monitor = GradientMonitor(params, rank=2, window=100, method="isvd", step_sketch=128, step_operator=operator,
                              error_size=0)
    for t in range(g.shape[0]):
        params["w"].grad, params["b"].grad = g[t].clone(), small[t].clone()
        monitor.update(step=5 * t)
    m = 128
    exact = g.norm(dim=1).double()
    est = monitor.sketched_norms("w")
    rel = (est.value - exact).abs() / exact
    # ||y|| / ||g|| has standard deviation 1/sqrt(2m): median |error| about 0.674 / sqrt(2m) = 4.2%
    # (one Omega serves every step, so the steps' errors are correlated and the median wanders).
    assert 0.4 * 0.674 / math.sqrt(2 * m) < float(rel.median()) < 1.8 * 0.674 / math.sqrt(2 * m)
    torch.testing.assert_close(est.error, est.value / math.sqrt(2 * m))
    assert float(((est.value - exact).abs() <= 3 * est.error).double().mean()) > 0.97
    torch.testing.assert_close(monitor.estimated_norms("w").value, est.value)
    torch.testing.assert_close(monitor.norms("w"), exact.float().double(), rtol=1e-6, atol=0)   # exact ones kept
    # Step-to-step cosines (true values about 0.87): error about (1 - c^2) / sqrt(m), far below the
    # rank-2 reconstruction's on this history.
    true_cos = torch.nn.functional.cosine_similarity(g[:-1], g[1:], dim=1).double()
    cos = monitor.cosines("w")
    err = (cos.value - true_cos).abs()
    assert float(err.median()) < 0.03 and float((err <= 3 * cos.error).double().mean()) > 0.9
    recon = monitor.cosines("w", source="reconstruction")
    assert float((recon.value - true_cos).abs().median()) > 5 * float(err.median())
    # Any pair, across windows.
    ip = monitor.inner_product("w", 5 * 7, 5 * 230)
    assert abs(float(ip.value) - float(g[7] @ g[230])) < 4 * float(ip.error)
    c = monitor.cosine("w", 5 * 7, 5 * 230)
    true_c = float(torch.nn.functional.cosine_similarity(g[7], g[230], dim=0))
    assert abs(float(c.value) - true_c) < 4 * float(c.error)
    # The small layer is kept exactly (orthogonal transform): zero error estimates.
    sb = monitor.sketched_norms("b")
    torch.testing.assert_close(sb.value, small.norm(dim=1).double(), rtol=1e-5, atol=0)
    assert float(sb.error.abs().max()) == 0.0
    torch.testing.assert_close(monitor.cosines("b").value,
                               torch.nn.functional.cosine_similarity(small[:-1], small[1:], dim=1).double(),
                               rtol=0, atol=1e-5)
    assert monitor.step_sketch("w").shape == (240, m) and monitor.step_sketch("b").shape == (240, 40)
    # Without an error sketch (error_size=0) the reconstruction's error estimates come from the step sketch.
    rec = monitor.gradients("w")
    true = (rec.value - g.double()).norm(dim=1)
    assert 0.8 < float((rec.error / true).median()) < 1.2


def test_step_sketch_memory_state_round_trip_and_continuation():
    g = _full_rank_history(steps=50, params=600)
    options = dict(rank=2, window=20, step_sketch=32, error_size=3, seed=4)
    first = _record(g[:30], **options)
    report = first.memory_report()
    # 2 windows of (20, 32) float32 rows, plus the SRFT's 600 int8 signs and 32 int64 row indices.
    rows = 2 * 20 * 32 * 4
    assert report["step_sketch_bytes"] == first.step_sketch_bytes == rows + 600 + 32 * 8
    assert report["step_sketch_bytes_per_step"] == 32 * 4 and report["layers"][0]["step_sketch"] == 32
    plain = _record(g[:30], **{**options, "step_sketch": 0})
    assert first.nbytes == plain.nbytes + report["step_sketch_bytes"]
    state = first.state_dict()
    assert state["windows"][1][0]["step_sketch"].shape == (20, 32)
    back = GradientMonitor.from_state_dict(state)
    torch.testing.assert_close(back.step_sketch("w"), first.step_sketch("w"))
    torch.testing.assert_close(back.cosines("w").value, first.cosines("w").value)
    torch.testing.assert_close(back.gradients("w").error, first.gradients("w").error)
    # Continuing a restored monitor equals recording the whole history at once.
    again = GradientMonitor({"w": torch.nn.Parameter(torch.zeros(600))}, **options)
    again.load_state_dict(state)
    for t in range(30, 50):
        again._params[0][0].grad = g[t].clone()
        again.update(step=10 + 2 * t)
    whole = _record(g, **options)
    torch.testing.assert_close(again.step_sketch("w"), whole.step_sketch("w"))
    torch.testing.assert_close(again.sketched_norms("w").value, whole.sketched_norms("w").value)
    # A state that lacks the step sketch its configuration asks for is refused.
    del state["windows"][0][0]["step_sketch"]
    with pytest.raises(ValueError, match="no step sketch"):
        GradientMonitor.from_state_dict(state)


def test_step_sketch_options_and_queries_are_checked():
    g, _ = _trajectory(10, 20, rank=1)
    plain = _record(g, rank=1, window=10)
    for call in (lambda: plain.step_sketch("w"), lambda: plain.sketched_norms("w"),
                 lambda: plain.inner_product("w", 10, 12), lambda: plain.cosines("w", source="step_sketch")):
        with pytest.raises(ValueError, match="no step sketch"):
            call()
    with pytest.raises(ValueError, match="source='sketch'"):
        plain.cosines("w", source="sketch")
    torch.testing.assert_close(plain.estimated_norms("w").value, plain.reconstructed_norms("w").value)
    for bad in (dict(step_sketch=-1), dict(step_sketch=2.0), dict(step_operator="dense")):
        with pytest.raises(ValueError):
            GradientMonitor(**bad)
    sketched = _record(g, rank=1, window=10, step_sketch=8)
    with pytest.raises(KeyError, match="step 11 was not recorded"):
        sketched.inner_product("w", 10, 11)
    empty = GradientMonitor({"w": torch.nn.Parameter(torch.zeros(3))}, step_sketch=4)
    assert empty.step_sketch("w").shape == (0, 3) and empty.cosines("w").value.numel() == 0
