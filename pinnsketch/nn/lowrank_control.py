"""The rank controller of the `lowrank` policy: rank, residual bits and exact fallback from measured errors.

The controller sees numbers only. Once per training step the policy hands it
what the step measured, per *call class* (the number of jet streams S of a
call: a PINN's residual points carry value and derivative streams, its
boundary and initial points the value alone), and asks it to decide:

* `observe_call(S, recon, path)`: the relative reconstruction error of a call
  of class S (the worst over its streams); `path` says the call carries
  derivative streams through a smooth activation, so its error also feeds the
  derivative path of earlier blocks.
* `observe_tails(S, {"up": f, "down": g})`: by which factor the low-rank
  residual would change at rank 2r and r/2 (from the basis' Ritz values).
* `observe_audit(S, grad_error, recon, amplification, noise)`: an audited
  call's measured weight-gradient error, the reconstruction error it came
  from (kappa = their ratio), and the per-point spread A of the gradient.
* `decide()`: the end of the step (`end_step()` when the rank is fixed).

The owner keeps `step` current (audits of one step are read together).

Per class c, ratio_c = kappa_c recon_c / target (the predicted weight-gradient
error over its target) and, for classes on the derivative path,
recon_c / (target / (path_gain A_c)). The block's ratio is the worst class's.
Classes are kept apart because they differ by orders of magnitude: a boundary
call's value stream may reconstruct 100x worse than the residual call's jet,
yet it feeds no derivative path and its gradient share is small; mixing the
two (the worst recon times the worst kappa, against the path target) would buy
rank that no error needs.

Decisions (`decide`): ratio > 1: of "double the rank" and "int4 -> int8" the
change with the best predicted reduction per stored byte (a change no dearer
that is predicted to reach half the target wins); with neither available for
`patience` steps, exact fallback. With a byte cap (`max_ratio`: stored bytes at
most that fraction of exact storage, `cost(rank, bits)` telling a configuration's
fraction) no change may cross the cap and there is no fallback: the block stays
at the cap, misses its target, and says so once (event "at_cap"). ratio < 1/4 for `patience` steps: the change
that saves the most bytes while predicted to stay below 1/2. In fallback, an
audit predicting below 1/2 resumes compression. Every change is an event
(`events`), for run files and plots.
"""

from __future__ import annotations

import copy
import math

__all__ = ["LowRankController", "INT8_GAIN"]

# int8's quantization step is 7/127 of int4's (codes in [-127, 127] against [-7, 7]).
INT8_GAIN = 127.0 / 7.0


class LowRankController:
    """Rank, residual bits and exact fallback of one `lowrank` block.

    Args:
        target: relative weight-gradient error to hold (> 0).
        rank: the starting rank (clamped to [r_min, r_max] once the width is known).
        bits: the starting residual bits of the derivative streams (4, 8 or None).
        r_min, r_max: rank bounds (clamped to the block's width by `start`).
        patience: consecutive steps far below target before shrinking, or saturated before falling back.
        path_gain: derivative-path classes hold recon below target / (path_gain A); None disables.
        noise_fraction: mini-batch training: the target becomes max(target, noise_fraction x noise).
        max_ratio: cap on the stored bytes as a fraction of exact storage (None: no cap; exact
            fallback allowed); needs `cost`.
        cost: (rank, bits) -> stored bytes / exact bytes of the block's largest call class.
    """

    KEEP_AUDITS = 64

    def __init__(self, target: float, *, rank: int, bits: int | None, r_min: int, r_max: int, patience: int,
                 path_gain: float | None, noise_fraction: float | None, max_ratio: float | None = None,
                 cost=None):
        if max_ratio is not None and cost is None:
            raise ValueError("max_ratio needs cost(rank, bits) -> stored fraction of exact bytes")
        self.target, self.r_min, self.r_max = float(target), r_min, r_max
        self.max_ratio, self.cost = max_ratio, cost
        self.patience, self.path_gain, self.noise_fraction = patience, path_gain, noise_fraction
        self.rank, self.bits, self.exact = rank, bits, False
        self.width: int | None = None
        self.noise: float | None = None
        self.recon: dict[int, float] = {}          # class -> the latest step's worst reconstruction error
        self.kappa: dict[int, float] = {}          # class -> gradient error / reconstruction error
        self.amplification: dict[int, float] = {}  # class -> per-point spread A of the gradient
        self.path: set[int] = set()                # classes on the derivative path
        self.tails: dict[int, dict[str, float]] = {}
        self.events: list[dict] = []
        self.audits: list[dict] = []               # the latest KEEP_AUDITS audits
        self.audit_count = 0
        self.step = 0
        self._seen: set[int] = set()               # classes measured in the current step
        self._calm = self._stuck = 0
        self._capped = False                       # at the byte cap with the target missed

    # -- bounds --------------------------------------------------------------------------
    def start(self, width: int) -> None:
        """Clamp the rank bounds (and the rank) to the block's width."""
        self.width = width
        self.rank = min(max(self.rank, self.lo), self.hi)

    @property
    def hi(self) -> int:
        return min(self.r_max, self.width or self.r_max)

    @property
    def lo(self) -> int:
        return min(self.r_min, self.hi)

    # -- observations ------------------------------------------------------------------------
    def observe_call(self, cls: int, recon: float, path: bool) -> None:
        """A measured call of class `cls` (its stream count) in the current step."""
        if path:
            self.path.add(cls)
        if cls in self._seen:
            self.recon[cls] = max(self.recon[cls], recon)
        else:
            self.recon[cls] = recon                 # the step's first measurement replaces the last step's
            self._seen.add(cls)

    def observe_tails(self, cls: int, tails: dict[str, float]) -> None:
        old = self.tails.get(cls, {}) if cls in self._seen else {}
        self.tails[cls] = {k: max(v, old.get(k, 0.0)) for k, v in tails.items()}

    def observe_audit(self, cls: int, grad_error: float, recon: float, amplification: float | None,
                      noise: float | None) -> None:
        """An audited call: its weight-gradient error, reconstruction error, spread A and sampling noise."""
        kappa = grad_error / recon if recon > 0 else None
        mine = [a for a in self.audits if a["streams"] == cls]
        if kappa is not None:
            # The most pessimistic kappa of this audit step and the class's previous one: the
            # cancellation behind kappa grows as training converges, so an old, smaller kappa
            # under-predicts.
            earlier = [a["step"] for a in mine if a["kappa"] is not None and a["step"] < self.step]
            recent = [a["kappa"] for a in mine if a["kappa"] is not None
                      and (a["step"] == self.step or (earlier and a["step"] == earlier[-1]))]
            self.kappa[cls] = max([kappa, *recent])
        if amplification is not None:
            same = [a["amplification"] for a in mine if a["step"] == self.step and a["amplification"] is not None]
            self.amplification[cls] = max([amplification, *same])
        if noise is not None:
            same = [a["noise"] for a in self.audits if a["step"] == self.step and a["noise"] is not None]
            self.noise = min([noise, *same])
        self.audits.append({"step": self.step, "grad_error": grad_error, "reconstruction_error": recon,
                            "kappa": kappa, "amplification": amplification, "noise": noise, "streams": cls,
                            "rank": self.rank, "bits": self.bits, "was_exact": self.exact})
        del self.audits[:-self.KEEP_AUDITS]     # L-BFGS evaluates a step many times: keep the recent ones
        self.audit_count += 1

    # -- figures -------------------------------------------------------------------------------
    def effective_target(self) -> float:
        """`target`, or for mini-batch training max(target, noise_fraction x measured sampling noise)."""
        if self.noise_fraction is None or self.noise is None:
            return self.target
        return max(self.target, self.noise_fraction * self.noise)

    def path_target(self, cls: int | None = None) -> float | None:
        """The reconstruction error the derivative path allows class `cls` (default: the tightest
        class on the path); None without path control or before an audit measured A."""
        if self.path_gain is None:
            return None
        classes = [c for c in (self.path if cls is None else {cls} & self.path) if c in self.amplification]
        if not classes:
            return None
        return self.effective_target() / (self.path_gain * max(self.amplification[c] for c in classes))

    def predicted_error(self) -> float | None:
        """max over classes of kappa x reconstruction error: the expected relative weight-gradient error."""
        known = [self.kappa[c] * self.recon[c] for c in self.kappa if c in self.recon]
        return max(known) if known else None

    def class_ratios(self) -> dict[int, float]:
        """Per calibrated class: the worst of predicted error / target and recon / path target."""
        out = {}
        for c in self.kappa:
            if c not in self.recon:
                continue
            ratio = self.kappa[c] * self.recon[c] / self.effective_target()
            path = self.path_target(c)
            if path is not None:
                ratio = max(ratio, self.recon[c] / path)
            out[c] = ratio
        return out

    def ratio(self) -> float | None:
        """The block's ratio: its worst class (None before the first audit)."""
        ratios = self.class_ratios()
        return max(ratios.values()) if ratios else None

    # -- multi-process training ------------------------------------------------------------
    def agree(self, reduce) -> None:
        """Replace this step's figures by the worst over all processes, so that every process
        decides alike: `reduce(values, lowest) -> values` takes the largest of each value over
        the processes (the smallest where `lowest`; None: not measured), e.g. `nn.collective.agree`.
        Two calls: the number of call classes, then every class's figures and the noise."""
        top = int(reduce([float(max([*self.recon, *self.kappa, *self.tails], default=0))])[0] or 0)
        classes = range(1, top + 1)
        values = []
        for c in classes:
            tails = self.tails.get(c, {})
            values += [self.recon.get(c), self.kappa.get(c), self.amplification.get(c), tails.get("up"),
                       tails.get("down"), 1.0 if c in self.path else None]
        values = reduce(values + [self.noise], [False] * len(values) + [True])
        for i, c in enumerate(classes):
            recon, kappa, amp, up, down, path = values[6 * i:6 * i + 6]
            for table, v in ((self.recon, recon), (self.kappa, kappa), (self.amplification, amp)):
                if v is not None:
                    table[c] = v
            if up is not None or down is not None:
                self.tails[c] = {k: v for k, v in (("up", up), ("down", down)) if v is not None}
            if path is not None:
                self.path.add(c)
        self.noise = values[-1]

    # -- decisions -------------------------------------------------------------------------
    def decide(self) -> None:
        """The end of the step: change rank, bits or fallback from the step's measurements."""
        self._decide()
        self.end_step()

    def end_step(self) -> None:
        """Forget which classes the step measured (the next step's first measurements replace them)."""
        self._seen = set()

    def _decide(self) -> None:
        ratios = self.class_ratios()
        if not ratios:
            return
        ratio = max(ratios.values())
        if self.exact:
            # Only an audit (which compressed anyway) can tell that compression works again.
            if self.audits and self.audits[-1]["step"] == self.step and ratio < 0.5:
                self.exact, self._stuck = False, 0
                self._event("resume_compression", predicted=ratio * self.effective_target())
            return
        if ratio > 1.0:
            self._calm = 0
            options = self._options(ratios, up=True)
            if not options:
                self._stuck += 1
                if self.max_ratio is not None:
                    if not self._capped:
                        self._capped = True
                        self._event("at_cap", predicted=ratio * self.effective_target(), max_ratio=self.max_ratio)
                elif self._stuck >= self.patience:
                    self.exact, self._stuck = True, 0
                    self._event("fallback_exact", predicted=ratio * self.effective_target())
                return
            self._stuck, self._capped = 0, False
            # the best predicted reduction per byte spent, unless a change no dearer is predicted
            # to reach half the target on its own
            best = max(options, key=lambda o: math.log(ratio / max(o[1], 1e-30)) / max(-o[2], 1e-9))
            enough = [o for o in options if o[1] <= 0.5 and o[2] >= best[2]]
            self._change(max(enough, key=lambda o: o[2])[0] if enough else best[0], ratio)
        elif ratio < 0.25:
            self._stuck = 0
            self._calm += 1
            if self._calm >= self.patience:
                safe = [o for o in self._options(ratios, up=False) if o[1] < 0.5]
                if safe:
                    self._change(max(safe, key=lambda o: o[2])[0], ratio)
                self._calm = 0
        else:
            self._calm = self._stuck = 0

    def _options(self, ratios: dict[int, float], up: bool) -> list[tuple[str, float, float]]:
        """Candidate changes: (name, predicted block ratio, bytes saved per row and stream (< 0: spent))."""
        w, r, u_bytes, options = self.width or 0, self.rank, 2, []

        def after(name: str, default: float) -> float:
            return max(ratio * self.tails.get(c, {}).get(name, default) for c, ratio in ratios.items())

        if up:
            if r < self.hi:
                new = min(2 * r, self.hi)
                options.append(("grow", after("up", 1.0) if new == 2 * r else max(ratios.values()),
                                -(new - r) * u_bytes))
            if self.bits == 4:
                options.append(("bits_up", max(ratios.values()) / INT8_GAIN, -w / 2))
            if self.max_ratio is not None:
                new = {"grow": (min(2 * r, self.hi), self.bits), "bits_up": (r, 8)}
                options = [o for o in options if self.cost(*new[o[0]]) <= self.max_ratio]
        else:
            if r > self.lo:
                new = max(self.lo, r // 2)
                options.append(("shrink", after("down", math.inf) if new == r // 2 else math.inf,
                                (r - new) * u_bytes))
            if self.bits == 8:
                options.append(("bits_down", max(ratios.values()) * INT8_GAIN, w / 2))
        return options

    def _change(self, change: str, ratio: float) -> None:
        old = self.rank
        if change == "grow":
            self.rank = min(2 * old, self.hi)
        elif change == "shrink":
            self.rank = max(self.lo, old // 2)
        elif change in ("bits_up", "bits_down"):
            gain = INT8_GAIN if change == "bits_up" else 1.0 / INT8_GAIN
            self.bits = 8 if change == "bits_up" else 4
            self.recon = {c: v / gain for c, v in self.recon.items()}
        info = {"error": ratio * self.effective_target()}
        if change in ("grow", "shrink"):
            info.update(old_rank=old, new_rank=self.rank)
        self._event(change, **info)

    def _event(self, kind: str, **info) -> None:
        self.events.append({"step": self.step, "event": kind, "rank": self.rank, "bits": self.bits, **info})

    # -- checkpoints ---------------------------------------------------------------------------
    _STATE = ("rank", "bits", "exact", "width", "noise", "recon", "kappa", "amplification", "path", "tails",
              "events", "audits", "audit_count", "step", "_seen", "_calm", "_stuck", "_capped")

    def state_dict(self) -> dict:
        """Plain values (class keys as strings, sets as sorted lists) for HDF5/JSON writers."""
        out = {}
        for k in self._STATE:
            v = copy.deepcopy(getattr(self, k))
            if isinstance(v, set):
                v = sorted(v)
            elif isinstance(v, dict) and k in ("recon", "kappa", "amplification", "tails"):
                v = {str(c): x for c, x in v.items()}
            out[k] = v
        return out

    def load_state_dict(self, state: dict) -> None:
        for k in self._STATE:
            v = copy.deepcopy(state[k])
            if k in ("path", "_seen"):
                v = set(v)
            elif k in ("recon", "kappa", "amplification", "tails"):
                v = {int(c): x for c, x in v.items()}
            setattr(self, k, v)
