"""Measure the activation memory autograd keeps for the backward pass.

`MemoryMeter` installs `torch.autograd.graph.saved_tensors_hooks` for the
duration of one training step (forward *and* backward) and counts the bytes of
the **distinct storages** that autograd holds on to: two saved views of one
buffer count once (dedupe by ``untyped_storage().data_ptr()``), and a storage
stops counting the moment the last saved reference to it is released (after
its node's backward ran, or when the graph is freed). ``peak_bytes`` is the
maximum of that live total over the step.

NOTE [what the meter sees]
    * Every tensor saved through ``ctx.save_for_backward`` or by a built-in
      op, while the meter's hooks are the innermost ``saved_tensors_hooks``.
      Tensors saved *during* backward (a recomputation inside a custom
      backward under ``enable_grad``) count too: they are part of the step.
    * Not parameters (``nn.Parameter``): they are model state and live
      anyway; pass ``include_parameters=True`` to count them.
    * Not what an inner hook hides: ``torch.utils.checkpoint`` installs its own
      hooks inside a checkpointed segment, so the tensors it drops (and later
      recomputes) never reach an outer hook. What checkpoint keeps alive, the
      segment inputs, it saves as ordinary saved tensors *outside* its hooks,
      so the meter counts them. Its backward recompute transient (one segment)
      is reported to the active meter by the storage policy through
      :meth:`MemoryMeter.track` (see `pinnsketch.nn.storage.CheckpointStorage`).
    * On CUDA, ``cuda_peak_bytes`` is ``torch.cuda.max_memory_allocated`` over
      the step, which includes everything (weights, gradients, workspace).

NOTE [the peak of a step]
    Saved bytes are a diagnostic; whether a problem fits is decided by the
    peak of *all* live tensor memory during the step: the saved set plus every
    temporary alive at that moment. ``MemoryMeter(step_peak=True)`` measures it
    as ``step_peak_bytes``, the maximum of the live tensor bytes during the step
    above those live when it began (the step's own working set):
      * CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at
        entry (the caching allocator's exact count of bytes in live tensors);
      * CPU: the running sum of the allocation and free events that torch's
        CPU allocator reports to the profiler (``profile_memory=True``), which
        sees every tensor buffer, including those an op allocates and frees
        inside itself. It costs a profiled step (op records), so meter a few
        steps, not all; it cannot run inside another torch profiler or outside
        the main thread (then the figure is None).
    What neither counts: memory outside torch's allocators (BLAS workspaces,
    Python objects, allocator fragmentation). Benchmarks that need the process's
    view use `ResidentPeak` in a fresh process.
"""

from __future__ import annotations

import contextvars
import os
import threading
import weakref

import torch

__all__ = ["MemoryMeter", "ResidentPeak", "available_bytes"]

# The stack of meters entered in the current context, innermost last. A
# ContextVar (not a module global) so concurrent threads or tasks each see
# their own meters; policies look up the innermost one to report storage that
# a nested hook hides from it.
_ACTIVE: contextvars.ContextVar[tuple["MemoryMeter", ...]] = contextvars.ContextVar(
    "pinnsketch_active_memory_meters", default=()
)


def _storage_key(t: torch.Tensor) -> tuple[tuple, int]:
    storage = t.untyped_storage()
    return (t.device.type, -1 if t.device.index is None else t.device.index, storage.data_ptr()), storage.nbytes()


class _Packed:
    """What autograd holds instead of the tensor; releasing it releases the bytes."""

    __slots__ = ("tensor", "_meter", "_key", "__weakref__")

    def __init__(self, tensor: torch.Tensor, meter: "MemoryMeter", key):
        self.tensor = tensor
        self._meter = meter
        self._key = key

    def __del__(self):
        self._meter._release(self._key)


class MemoryMeter:
    """Count distinct storages autograd saves for backward during one step.

    Usage::

        with MemoryMeter() as meter:
            loss = model.jet(x, spec) ...          # forward
            loss.backward()                        # backward inside the block
        meter.peak_bytes, meter.cuda_peak_bytes    # int, int | None (None on CPU)

    Attributes (valid after exit, and live during the step):
        peak_bytes: maximum over the step of the bytes of distinct saved storages.
        live_bytes: bytes still held (0 after a complete backward that freed the graph).
        saved_bytes_total: bytes of all distinct storages ever saved in the step.
        cuda_peak_bytes: ``torch.cuda.max_memory_allocated`` over the step on the CUDA
            device the saved tensors live on; None when no saved tensor was on CUDA.

        step_peak_bytes: with ``step_peak=True``, the peak of all live tensor bytes during
            the step above those live at entry (see NOTE [the peak of a step]); None without
            it, or when it could not be measured.

    Args:
        include_parameters: also count saved ``nn.Parameter`` tensors (default False).
        step_peak: also measure ``step_peak_bytes`` (on the CPU through the profiler's memory
            events: a profiled step).
    """

    def __init__(self, *, include_parameters: bool = False, step_peak: bool = False):
        for name, value in (("include_parameters", include_parameters), ("step_peak", step_peak)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.include_parameters = include_parameters
        self.step_peak = step_peak
        self.step_peak_bytes: int | None = None
        self._profiler = None
        self._quiet = None
        self._cuda_baseline: dict[int, int] = {}
        self.peak_bytes = 0
        self.live_bytes = 0
        self.saved_bytes_total = 0
        self.cuda_peak_bytes: int | None = None
        self._refs: dict = {}          # storage key -> [count, nbytes]
        self._lock = threading.Lock()
        self._hooks = None
        self._token = None
        self._cuda_devices: set[int] = set()
        self._cuda_reset: list[int] = []

    # -- context manager ----------------------------------------------------------
    def __enter__(self) -> "MemoryMeter":
        if self._hooks is not None:
            raise RuntimeError("this MemoryMeter is already active; use a new MemoryMeter per step")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # Reset every initialized device's peak; read the one the tensors used.
            self._cuda_reset = list(range(torch.cuda.device_count()))
            for index in self._cuda_reset:
                torch.cuda.reset_peak_memory_stats(index)
                self._cuda_baseline[index] = torch.cuda.memory_allocated(index)
        if self.step_peak:
            self._quiet = _QuietProfilerLog()
            self._quiet.__enter__()
            self._profiler = _start_allocation_profiler()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        self._token = _ACTIVE.set(_ACTIVE.get() + (self,))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        self._hooks.__exit__(*exc)
        if self._cuda_devices:
            self.cuda_peak_bytes = max(torch.cuda.max_memory_allocated(i) for i in self._cuda_devices)
        cpu_peak = _stop_allocation_profiler(self._profiler) if self._profiler is not None else None
        self._profiler = None
        if self.step_peak:
            self._quiet.__exit__(*exc)
        if self.step_peak:
            if self._cuda_devices:
                self.step_peak_bytes = max(torch.cuda.max_memory_allocated(i) - self._cuda_baseline.get(i, 0)
                                           for i in self._cuda_devices)
            else:
                self.step_peak_bytes = cpu_peak

    @staticmethod
    def current() -> "MemoryMeter | None":
        """The innermost meter entered in this context, or None."""
        stack = _ACTIVE.get()
        return stack[-1] if stack else None

    # -- accounting ---------------------------------------------------------------
    def track(self, *tensors: torch.Tensor) -> None:
        """Count the storages of ``tensors`` as saved until each storage is freed.

        For memory a nested hook hides from the meter (checkpoint's recompute
        transient): the bytes count from now until the storage itself dies
        (a finalizer on the storage, which PyTorch keeps alive exactly as long
        as any tensor uses it).
        """
        for t in tensors:
            key = self._acquire(t)
            weakref.finalize(t.untyped_storage(), self._release, key)

    def _acquire(self, t: torch.Tensor):
        key, nbytes = _storage_key(t)
        if t.is_cuda:
            self._cuda_devices.add(t.device.index if t.device.index is not None else torch.cuda.current_device())
        with self._lock:
            entry = self._refs.get(key)
            if entry is None:
                self._refs[key] = [1, nbytes]
                self.live_bytes += nbytes
                self.saved_bytes_total += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            else:
                entry[0] += 1
        return key

    def _release(self, key) -> None:
        with self._lock:
            entry = self._refs.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] == 0:
                del self._refs[key]
                self.live_bytes -= entry[1]

    def _skip(self, t: torch.Tensor) -> bool:
        if t.layout != torch.strided:
            return True
        # Parameters and their views (Linear saves weight.t()) are model state.
        base = t if t._base is None else t._base
        return isinstance(base, torch.nn.Parameter) and not self.include_parameters

    def _pack(self, t: torch.Tensor):
        if self._skip(t):
            return t
        return _Packed(t, self, self._acquire(t))

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed

    def __repr__(self) -> str:
        return (f"MemoryMeter(peak_bytes={self.peak_bytes}, live_bytes={self.live_bytes}, "
                f"cuda_peak_bytes={self.cuda_peak_bytes})")


class _QuietProfilerLog:
    """Drop the profiler's C++ log lines from standard error while it runs; pass everything else on.

    torch's profiler prints "profiler_start/stop" lines (and a one-time allocator note) from C++
    straight to file descriptor 2 on every start and stop, with no switch to turn them off; a
    metered training step would scatter them through a user's output. Standard error is sent
    to a temporary file meanwhile and replayed without those lines.
    """

    _NOISE = ("USDT:", "STAGE:", "CPUAllocator.cpp", "SyncActivityProfilerHandler", "External init callback")

    def __enter__(self):
        import sys
        import tempfile

        self._file = None
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
        except (OSError, ValueError, AttributeError):      # no real descriptor 2: nothing to filter
            return self
        self._file = tempfile.TemporaryFile()
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        import sys

        if self._file is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        kept = [line for line in self._file.read().decode(errors="replace").splitlines(keepends=True)
                if not any(mark in line for mark in self._NOISE)]
        self._file.close()
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def _start_allocation_profiler():
    """A running CPU profiler that records allocator events, or None where one cannot start
    (another profiler is active, or this is not the main thread: torch's profiler backend
    registers itself with the thread that first starts it)."""
    from torch.profiler import ProfilerActivity, profile

    if threading.current_thread() is not threading.main_thread():
        return None

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    try:
        prof.__enter__()
    except RuntimeError:               # another profiler is active
        return None
    return prof


def _stop_allocation_profiler(prof) -> int | None:
    """Stop `prof`; the peak of the running sum of its CPU allocation events (bytes above entry)."""
    try:
        prof.__exit__(None, None, None)
        from torch._C._profiler import _EventType

        events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
    except (RuntimeError, AttributeError, ImportError):   # a torch without these records
        return None
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


class ResidentPeak:
    """Peak resident memory of this process above its level at entry, by sampling (Linux).

    For benchmarks that run one configuration per fresh process: what the operating
    system sees, whoever allocated it (torch, BLAS workspaces, Python). A thread reads
    ``/proc/self/statm`` every `interval` seconds (default 0.5 ms) while the block runs;
    a peak shorter than the interval can be missed, so it is a lower bound, exact for
    plateaus. The allocator may keep freed memory mapped (glibc), so run the measured
    step in a process that has not yet held more than the step needs.

    Usage::

        with ResidentPeak() as rss:
            step()
        rss.peak_bytes       # int: max(RSS) - RSS at entry, >= 0

    Raises RuntimeError on entry where ``/proc/self/statm`` does not exist (not Linux).
    """

    def __init__(self, interval: float = 5e-4):
        if not interval > 0:
            raise ValueError(f"interval={interval!r} must be a positive number of seconds")
        self.interval = float(interval)
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0

    @staticmethod
    def resident_bytes() -> int:
        """The process's resident set size now, in bytes."""
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self.resident_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "ResidentPeak":
        try:
            self.baseline_bytes = self._max = self.resident_bytes()
        except OSError as e:
            raise RuntimeError(f"ResidentPeak needs /proc/self/statm (Linux): {e}") from None
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, self.resident_bytes())
        self.peak_bytes = max(0, self._max - self.baseline_bytes)


def available_bytes(device: torch.device) -> int | None:
    """Bytes this process could still allocate on `device`, or None where that is unknown.

    CUDA: the device's free memory plus what torch's caching allocator holds unused.
    CPU: the kernel's estimate of memory available without swapping (MemAvailable of
    /proc/meminfo, Linux; a cgroup limit below it is not seen).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
