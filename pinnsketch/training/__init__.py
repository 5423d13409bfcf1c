"""pinnsketch.training: what every training loop shares.

`train_step` runs one optimizer step (the model's `advance()`, optional memory
metering, zero_grad / loss / finiteness check / backward / update, its time);
`Callback` and `TrainingState` are the hooks a loop calls and the state they
see; `EarlyStopping` and `ProgressBar` are ready-made callbacks. The PINN
solver (`pinnsketch.pinn`) and the classifier trainer (`pinnsketch.data`) both
build on it, and the run-file writer (`pinnsketch.io`) is a `Callback`.
"""

from .callbacks import STATE_FORMAT, Callback, EarlyStopping, ProgressBar, TrainingState
from .step import StepRecord, TrainingDivergedError, advance, crossed, fused_step, train_step

__all__ = ["Callback", "TrainingState", "EarlyStopping", "ProgressBar", "STATE_FORMAT", "TrainingDivergedError",
           "StepRecord", "train_step", "fused_step", "advance", "crossed"]
