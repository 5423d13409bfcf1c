"""MemoryMeter: exact byte counts on known graphs, storage dedupe, release, checkpoint honesty."""

import gc

import pytest
import torch

from pinnsketch.nn import MLP, CheckpointStorage, MemoryMeter


def test_linear_tanh_chain_counts_known_bytes():
    n, d, w, layers = 64, 5, 16, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    net = torch.nn.Sequential(*[m for i in range(layers)
                                for m in (torch.nn.Linear(d if i == 0 else w, w), torch.nn.Tanh())])
    with MemoryMeter() as meter:
        y = net(x)
        after_forward = meter.live_bytes
        y.sum().backward()
    # Linear saves its input (x, then each tanh output); tanh saves its output (the same
    # storage the next Linear saves); weights are parameters and not counted.
    expected = n * d * 4 + layers * n * w * 4
    assert after_forward == expected
    assert meter.peak_bytes == expected
    assert meter.live_bytes == 0
    assert meter.cuda_peak_bytes is None


def test_distinct_storages_are_counted_once():
    class TwoViews(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x[:10], x[10:], x)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            ctx.saved_tensors
            return g * 2

    x = torch.randn(30, 4, requires_grad=True)
    with MemoryMeter() as meter:
        TwoViews.apply(x).sum().backward()
    assert meter.peak_bytes == 30 * 4 * 4


def test_parameters_excluded_unless_asked():
    lin = torch.nn.Linear(8, 8, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    with MemoryMeter() as plain:
        lin(x).sum().backward()
    with MemoryMeter(include_parameters=True) as full:
        lin(x).sum().backward()
    assert plain.peak_bytes == 4 * 8 * 4
    assert full.peak_bytes == 4 * 8 * 4 + 8 * 8 * 4


def test_live_bytes_fall_during_backward():
    x = torch.randn(100, 10)
    net = torch.nn.Sequential(torch.nn.Linear(10, 50), torch.nn.Tanh(), torch.nn.Linear(50, 50), torch.nn.Tanh())
    seen = []
    with MemoryMeter() as meter:
        h = net[1](net[0](x))
        h.register_hook(lambda grad: seen.append(meter.live_bytes))
        y = net[3](net[2](h))
        y.sum().backward()
    # When the gradient reaches h, the second Linear/Tanh released what only they held.
    assert seen and seen[0] < meter.peak_bytes


def test_track_counts_until_storage_freed():
    with MemoryMeter() as meter:
        t = torch.empty(1000)
        meter.track(t, t[:10])
        assert meter.live_bytes == 4000
        del t
        assert meter.live_bytes == 0
    assert meter.peak_bytes == 4000


def test_meter_is_single_use_and_current():
    meter = MemoryMeter()
    assert MemoryMeter.current() is None
    with meter:
        assert MemoryMeter.current() is meter
        with pytest.raises(RuntimeError, match="already active"):
            meter.__enter__()
    assert MemoryMeter.current() is None


def test_checkpoint_recompute_is_counted(spec2):
    """One segment over the whole network keeps only the input in forward, but its backward
    recomputes (and holds) every block input: an honest meter reports about exact's peak."""
    x = torch.rand(256, 2, generator=torch.Generator().manual_seed(0))
    peaks = {}
    for name, storage in {"exact": "exact", "whole": CheckpointStorage(segment=5),
                          "sqrt": "checkpoint"}.items():
        model = MLP(2, 1, width=32, depth=4, storage=storage)
        with MemoryMeter() as meter:
            (model.jet(x, spec2).streams ** 2).sum().backward()
        peaks[name] = meter.peak_bytes
    assert peaks["whole"] >= 0.8 * peaks["exact"]
    assert peaks["sqrt"] < 0.8 * peaks["exact"]


def test_checkpoint_gradients_are_exact(spec2):
    x = torch.rand(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for storage in ("exact", "checkpoint", CheckpointStorage(segment=2)):
        model = MLP(2, 1, width=16, depth=4, storage=storage, seed=2, dtype=torch.float64)
        (model.jet(x, spec2).streams ** 2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_reported():
    x = torch.randn(128, 16, device="cuda")
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh()).cuda()
    with MemoryMeter() as meter:
        net(x).sum().backward()
    assert meter.cuda_peak_bytes is not None and meter.cuda_peak_bytes >= meter.peak_bytes


def test_step_peak_counts_a_known_allocation_pattern_on_cpu():
    """1 MiB, then 2 MiB, free the first, then 3 MiB: the live bytes peak at 5 MiB above entry,
    whatever was allocated before (a 4 MiB tensor alive throughout and one freed inside)."""
    before = torch.empty(4 << 20, dtype=torch.uint8)
    doomed = torch.empty(1 << 20, dtype=torch.uint8)
    # a garbage collection inside the window would free other tests' tensors (correctly counted as
    # live bytes going down, 16 KiB once in CI): collect first and hold the collector off
    gc.collect()
    gc.disable()
    try:
        with MemoryMeter(step_peak=True) as meter:
            a = torch.empty(1 << 20, dtype=torch.uint8)
            b = torch.empty(2 << 20, dtype=torch.uint8)
            del a, doomed
            c = torch.empty(3 << 20, dtype=torch.uint8)
            del b, c
    finally:
        gc.enable()
    # exact, less any tensor of another test freed in the window (at most a few KiB; not 1 MiB)
    assert (5 << 20) - (64 << 10) <= meter.step_peak_bytes <= 5 << 20
    assert before.numel() == 4 << 20


def test_step_peak_sees_temporaries_that_saved_bytes_do_not():
    """A step whose only saved tensor is small but which builds a large temporary: the saved-bytes
    meter sees the small tensor, the step peak sees the temporary."""
    x = torch.randn(256, 256, requires_grad=True)
    with MemoryMeter(step_peak=True) as meter:
        big = x.detach().repeat(16, 1)            # 4 MiB temporary, not saved for backward
        y = (x * big[:256].sum()).tanh().sum()    # saves x-sized tensors only
        del big
        y.backward()
    assert meter.peak_bytes < 2 << 20
    assert meter.step_peak_bytes >= 4 << 20


def test_step_peak_keeps_other_standard_error_output(capfd):
    import sys

    with MemoryMeter(step_peak=True):
        print("a line of the user's", file=sys.stderr)
    err = capfd.readouterr().err
    assert "a line of the user's" in err
    assert "profiler_start" not in err and "USDT" not in err


def test_step_peak_off_by_default():
    with MemoryMeter() as meter:
        torch.ones(10)
    assert meter.step_peak_bytes is None


def test_step_peak_is_none_outside_the_main_thread():
    import threading

    out = {}

    def work():
        with MemoryMeter(step_peak=True) as meter:
            torch.ones(1 << 16)
        out["peak"] = meter.step_peak_bytes

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert out == {"peak": None}
