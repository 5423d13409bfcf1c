"""Mini-batch training of image classifiers through the sketched-layer core.

`make_classifier` builds an MLP (flattened images) or a CNN with a storage policy;
`train_classifier` runs seeded, shuffled mini-batch training (Adam or SGD), measures the
saved-activation memory of every step with `MemoryMeter`, evaluates on the test split
and reports to optional callbacks (`pinnsketch.training.Callback`, phase "train"). Each
step goes through `pinnsketch.training.train_step`, as the PINN solver's do.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..nn import CNN, MLP
from ..training import TrainingState, train_step
from .dataset import ImageDataset
from .preprocess import Standardizer

__all__ = ["ARCHITECTURES", "OPTIMIZERS", "MINIBATCH_OPTIONS", "ClassifierResult", "evaluate", "make_classifier",
           "minibatch_storage", "train_classifier"]

ARCHITECTURES = ("mlp", "cnn")
OPTIMIZERS = ("adam", "sgd")

#: Options a policy named without options gets for mini-batch training: `lowrank` holds its
#: weight-gradient error to a quarter of the batch's own sampling noise (when that is looser
#: than its target), which costs at most ~6% of the batch (`LowRankStorage`, noise_fraction).
MINIBATCH_OPTIONS = {"lowrank": {"noise_fraction": 0.25}}


def minibatch_storage(storage: Any) -> Any:
    """`storage` for mini-batch training: a policy name in `MINIBATCH_OPTIONS` becomes the policy
    built with those options; anything else (other names, policy objects) passes unchanged.
    A per-layer list is mapped element by element."""
    if isinstance(storage, str) and storage in MINIBATCH_OPTIONS:
        from ..nn import STORAGES

        return STORAGES[storage](**MINIBATCH_OPTIONS[storage])
    if isinstance(storage, (list, tuple)):
        return [minibatch_storage(s) for s in storage]
    return storage


def make_classifier(
    data: ImageDataset,
    architecture: str = "mlp",
    *,
    storage: Any = "exact",
    width: int = 256,
    depth: int = 2,
    activation: str = "relu",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> torch.nn.Module:
    """A classifier for `data` with the given storage policy, initialized from `seed`.

    Args:
        data: fixes the input size (MLP: C*H*W features; CNN: C channels) and the classes.
        architecture: "mlp" (flattened images, `depth` hidden layers of `width`) or "cnn".
        storage: a policy name ("exact" | "checkpoint" | "ema" | "lowrank" | "projection"),
            a policy object or a per-layer list. Names get the mini-batch options of
            `MINIBATCH_OPTIONS` ("lowrank": noise_fraction=0.25, see `minibatch_storage`);
            policy objects are passed to the model unchanged.
        width, depth, activation: MLP shape (ignored by the CNN, which takes `kwargs`:
            channels, hidden).
        seed: initialization seed; equal seeds give equal weights under every storage
            policy, so policies can be compared from the same starting point.
        **kwargs: passed on to `MLP` / `CNN`.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    storage = minibatch_storage(storage)
    # An int seed (not a shared generator) so that the weights do not depend on the policy:
    # the models derive the storage seeds from it separately.
    if architecture == "mlp":
        return MLP(data.num_features, data.num_classes, width=width, depth=depth, activation=activation,
                   storage=storage, seed=seed, dtype=dtype, **kwargs)
    channels, height, width_px = data.image_shape
    if height != width_px:
        raise ValueError(f"the CNN takes square images; {data.name} images are {height}x{width_px}; "
                         "use architecture='mlp'")
    return CNN(storage, in_channels=channels, image_size=height, num_classes=data.num_classes, seed=seed,
               dtype=dtype, **kwargs)


@dataclasses.dataclass
class ClassifierResult:
    """What `train_classifier` returns.

    Attributes:
        model: the trained model (on the training device).
        test_accuracy: fraction of the test split classified correctly after training.
        history: one dict per epoch: epoch, loss (mean training cross-entropy),
            train_accuracy (on the training batches as seen), test_accuracy, epoch_time_s.
        saved_bytes_peak: the largest `MemoryMeter.peak_bytes` over all training steps.
        step_saved_bytes: `MemoryMeter.peak_bytes` of every training step, in order (audit
            steps of adaptive policies hold more than the others).
        cuda_peak_bytes: the largest CUDA allocator peak over the steps (None on CPU).
        storage_report: `model.storage_report()` after the last training step, before the
            final evaluation ([] for plain torch models).
        steps: optimizer steps taken.
        saved_bytes_peak_per_rank: under torch.distributed, each rank's saved_bytes_peak
            (saved_bytes_peak is then their maximum); None in one process.
    """

    model: torch.nn.Module
    test_accuracy: float
    history: list[dict]
    saved_bytes_peak: int
    step_saved_bytes: list[int]
    cuda_peak_bytes: int | None
    storage_report: list[dict]
    steps: int
    saved_bytes_peak_per_rank: list[int] | None = None

    @property
    def epoch_times(self) -> list[float]:
        return [h["epoch_time_s"] for h in self.history]


def _flattens(model: torch.nn.Module) -> bool:
    # An MLP takes (N, features); a CNN takes images (N, C, H, W).
    return not isinstance(model, CNN)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _dtype_of(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    transform: Standardizer,
    *,
    batch_size: int = 1000,
) -> float:
    """Fraction of `images` (uint8 (N, C, H, W)) whose argmax prediction equals `labels` (N,)."""
    was_training = model.training
    model.eval()
    device, dtype = _device_of(model), _dtype_of(model)
    correct = 0
    try:
        for start in range(0, len(labels), batch_size):
            x = transform(images[start:start + batch_size].to(device), dtype)
            correct += int((model(x).argmax(dim=1) == labels[start:start + batch_size].to(device)).sum())
    finally:
        model.train(was_training)
    return correct / max(len(labels), 1)


def _make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def _training_state(model, optimizer, config, generator, callbacks, max_steps):
    return TrainingState(problem=None, model=model, optimizer=optimizer, phase="train", config=config,
                         lr=optimizer.param_groups[0]["lr"], generator=generator, callbacks=callbacks,
                         max_steps=max_steps)


def train_classifier(
    model: torch.nn.Module,
    data: ImageDataset,
    *,
    epochs: int = 3,
    batch_size: int = 128,
    optimizer: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    callbacks: Sequence = (),
    progress: bool | None = None,
    eval_batch_size: int = 1000,
    drop_last: bool = True,
    distributed=None,
) -> ClassifierResult:
    """Train `model` on `data.train_*` with shuffled mini-batches; evaluate on `data.test_*`.

    Every step is one `pinnsketch.training.train_step`: the model's `advance()` (new sketch
    seeds, rank updates) when it has one, then forward, backward and the update inside a
    `MemoryMeter` (saved bytes only: no profiled `step_peak`, since every step is metered).

    Args:
        model: an MLP (fed flattened images) or CNN from `make_classifier`, or any module
            mapping (N, C*H*W) -> (N, classes).
        data: the dataset (uint8 images; moved to `device` once, standardized per batch).
        epochs, batch_size: passes over the training split and samples per step.
        drop_last: skip each epoch's last, smaller batch (default). Sketched policies size
            their test matrices by the batch and `ema` resets its sketches when the shape
            changes, so equal batches keep every policy on its steady state.
        optimizer: "adam" or "sgd" (momentum 0.9); lr, weight_decay as in torch.optim.
        seed: seeds the CPU `torch.Generator` that shuffles; equal seeds give equal batches.
        device: where to train (default: where the model is).
        callbacks: objects following the `Callback` protocol (on_start/on_step/on_end),
            called with one `TrainingState` updated in place: phase "train", losses
            {"cross_entropy": float}, saved_bytes_peak of the step; setting its
            `stop_training` ends training after the current step.
        progress: show a tqdm bar; default: only when stderr is a terminal.
        distributed: None (default): when launched by torchrun as one of several processes,
            train as one rank (`pinnsketch.training.distributed`): a `DistributedSampler` gives each
            rank its share of every epoch and each rank batch_size / world_size samples of a
            step, the loss and gradients are averaged over the ranks (a step is one step on
            the global batch), only rank 0 shows progress and runs callbacks; a
            ps.Distributed(...) sets the options; False: never.

    Returns:
        ClassifierResult.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if not lr > 0:
        raise ValueError(f"lr={lr} must be positive")
    if progress is None:
        progress = sys.stderr.isatty()
    device = torch.device(device) if device is not None else _device_of(model)
    from ..training.distributed import session

    with session(distributed, device) as group:
        return _train(model, data, group, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                      weight_decay=weight_decay, seed=seed, device=device, callbacks=callbacks, progress=progress,
                      eval_batch_size=eval_batch_size, drop_last=drop_last)


def _train(model, data, group, *, epochs, batch_size, optimizer, lr, weight_decay, seed, device, callbacks, progress,
           eval_batch_size, drop_last) -> ClassifierResult:
    world = 1 if group is None else group.world_size
    if group is not None:
        device = group.device
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} is the global batch and must be divisible by the "
                             f"{world} ranks; pass a multiple of {world}")
        callbacks = callbacks if group.main else ()
        progress = progress and group.main
    model = model.to(device)
    dtype = _dtype_of(model)
    transform = Standardizer(data, flatten=_flattens(model))
    train_x, train_y = data.train_images.to(device), data.train_labels.to(device)
    opt = _make_optimizer(optimizer, model.parameters(), lr, weight_decay)
    # Shuffling draws from its own CPU generator (same permutation on every device).
    shuffle = torch.Generator().manual_seed(seed)
    report = getattr(model, "storage_report", lambda: [])
    policies = sorted({str(r.get("storage")) for r in report()})
    config = {"dataset": data.name, "model": type(model).__name__, "storage": ",".join(policies) or None,
              "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
              "weight_decay": weight_decay, "seed": seed, "device": str(device)}

    n = len(train_y)
    sampler = None
    if group is not None:
        from torch.utils.data import DistributedSampler

        # every rank sees its own n / world samples of each epoch's permutation
        sampler = DistributedSampler(range(n), num_replicas=world, rank=group.rank, shuffle=True, seed=seed,
                                     drop_last=True)
        n, batch_size = len(sampler), batch_size // world
    if drop_last and batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training samples of {data.name!r}, so "
                         "drop_last=True leaves no batch; lower batch_size or pass drop_last=False")
    steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    seen = steps_per_epoch * batch_size if drop_last else n
    history, step_bytes, cuda_peak, final_report = [], [], None, []
    callbacks = list(callbacks)
    state = (_training_state(model, opt, config, shuffle, callbacks, epochs * steps_per_epoch)
             if callbacks else None)
    # the stop flags every rank follows (rank 0's callbacks set them)
    flags = None if group is None else state or _training_state(model, opt, config, shuffle, [], 0)
    start_time = time.perf_counter()
    for cb in callbacks:
        cb.on_start(state)
    model.train()
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, desc=f"{data.name}", leave=False)
    try:
        for epoch in range(epochs):
            if sampler is None:
                order = torch.randperm(n, generator=shuffle).to(device)
            else:
                sampler.set_epoch(epoch)
                order = torch.tensor(list(sampler), dtype=torch.int64, device=device)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            _synchronize(device)
            t0 = time.perf_counter()
            for start in range(0, seen, batch_size):
                idx = order[start:start + batch_size]
                x, y = transform(train_x[idx], dtype), train_y[idx]
                outputs: list[torch.Tensor] = []
                reduce = None
                if group is not None:  # the mean over the global batch: each rank's 1/world share, summed
                    reduce = functools.partial(_reduce_share, group, list(model.parameters()))
                # The finiteness check reads the loss back (a device sync): only when it is shown anyway.
                record = train_step(model, opt, functools.partial(_cross_entropy, model, x, y, outputs, world),
                                    meter=True, step_peak=False, check=bool(callbacks or progress),
                                    names=["cross_entropy", "cross_entropy"], reduce=reduce,
                                    where=f"step {len(step_bytes) + 1} (epoch {epoch + 1})", hint=f"Lower lr={lr}.")
                meter, logits, local = record.meter, outputs[0].detach(), outputs[1]
                step_bytes.append(meter.peak_bytes)
                if meter.cuda_peak_bytes is not None:
                    cuda_peak = max(cuda_peak or 0, meter.cuda_peak_bytes)
                loss_sum += local.to(torch.float64) * len(y)      # this rank's samples (summed over ranks below)
                correct += (logits.argmax(dim=1) == y).sum()
                if record.values is not None:
                    value = record.values[0]
                    bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                bar.update()
                if state is not None:
                    state.step, state.loss, state.losses = len(step_bytes), value, {"cross_entropy": value}
                    state.lr, state.wall_time_s = opt.param_groups[0]["lr"], time.perf_counter() - start_time
                    state.saved_bytes_peak, state.storage_report = meter.peak_bytes, report()
                    for cb in callbacks:
                        cb.on_step(state)
                if flags is not None:  # rank 0's callbacks decide for every rank
                    flags.step = len(step_bytes)
                    group.after_step(flags, list(model.parameters()))
                if state is not None and (state.stop_training or state.stop_phase):
                    break
                if flags is not None and (flags.stop_training or flags.stop_phase):
                    break
            _synchronize(device)
            epoch_time = time.perf_counter() - t0
            final_report = report()
            done = (len(step_bytes) - epoch * steps_per_epoch) * batch_size  # < seen when a callback stopped
            counted = min(done, seen)
            if group is not None:  # the epoch's figures over all ranks
                totals = torch.stack([loss_sum, correct.to(torch.float64)]).to(group.comm_device)
                torch.distributed.all_reduce(totals)
                loss_sum, correct, counted = totals[0], int(totals[1]), counted * world
            mean_loss = float(loss_sum) / counted
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"cross-entropy became {mean_loss} in epoch {epoch + 1}; lower lr={lr}")
            history.append({
                "epoch": epoch + 1,
                "loss": mean_loss,
                "train_accuracy": int(correct) / counted,
                "test_accuracy": evaluate(model, data.test_images, data.test_labels, transform,
                                          batch_size=eval_batch_size),
                "epoch_time_s": epoch_time,
            })
            if flags is not None and (flags.stop_training or flags.stop_phase):
                break
            if state is not None and (state.stop_training or state.stop_phase):
                break
    finally:
        bar.close()
    per_rank = None if group is None else group.gather_ints([max(step_bytes)])[0]
    result = ClassifierResult(model=model, test_accuracy=history[-1]["test_accuracy"], history=history,
                              saved_bytes_peak=max(per_rank or step_bytes), step_saved_bytes=step_bytes,
                              cuda_peak_bytes=cuda_peak, storage_report=final_report, steps=len(step_bytes),
                              saved_bytes_peak_per_rank=per_rank)
    if state is not None:
        state.saved_bytes_peak, state.storage_report = result.saved_bytes_peak, final_report
        state.wall_time_s = time.perf_counter() - start_time
        for cb in callbacks:
            cb.on_end(state, result)
    return result


def _cross_entropy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, outputs: list, world: int = 1) -> tuple:
    """(cross-entropy of model(x) against labels y (N,) / world, None): this process's share of the mean
    over the global batch; the logits (N, classes) and the local cross-entropy (detached) go to `outputs`."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    outputs += [logits, loss.detach()]
    return (loss if world == 1 else loss / world), None


def _reduce_share(group, params: list, loss: torch.Tensor, terms) -> tuple[torch.Tensor, list[float]]:
    """Multi-process step: the ranks' shares and gradients summed (`Group.reduce_step`)."""
    return group.reduce_step(loss, loss.detach().reshape(1) if terms is None else terms, params)


def _synchronize(device: torch.device) -> None:
    # Honest epoch timings on CUDA: wait for queued kernels before reading the clock.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
