"""pinnsketch.io: runs in HDF5 files (schema in SCHEMA.md): write, read, checkpoint, resume."""

from .errors import RunFileError
from .packed import read_packed, write_packed
from .plot import plot_run
from .reader import Run, Solution, load, load_checkpoint, open_run
from .schema import SCHEMA_VERSION
from .summary import format_summary, summarize
from .tree import read_tree, write_tree
from .runfile import RunFileLocked, check_output_path
from .writer import WRITE_MODES, RunWriter, save_result

__all__ = [
    "SCHEMA_VERSION",
    "RunFileError",
    "RunWriter",
    "RunFileLocked",
    "check_output_path",
    "WRITE_MODES",
    "save_result",
    "load",
    "load_checkpoint",
    "open_run",
    "Run",
    "Solution",
    "summarize",
    "format_summary",
    "plot_run",
    "write_tree",
    "read_tree",
    "write_packed",
    "read_packed",
]
