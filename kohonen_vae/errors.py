"""The errors a user meets, in one place, and the one handler that shows them.

Every expected problem (a bad config value, a missing dataset, a run that cannot be resumed, a damaged
checkpoint, a batch of NaNs, a full disk, a missing optional package) is one of :data:`USER_ERRORS`. The
command line prints it as one line, ``kohonen-vae COMMAND: error: MESSAGE``, and exits with code 2; the
message names the problem and the fix. Anything else is a bug and keeps its traceback.

This module imports nothing from the package: every other module may import it.
"""
from __future__ import annotations

import errno
import sys


class ConfigError(ValueError):
    """A configuration is invalid; the message names the key, the valid choices and the fix."""


class ResumeError(ConfigError):
    """A run cannot be started or resumed as asked (changed config, missing or damaged checkpoint, a folder
    that is not ours, a run directory locked by another process). Nothing in the run directory was changed."""


class CheckpointError(ResumeError):
    """A checkpoint file is missing, truncated, not ours, or its content does not match its checksum."""


class NonFiniteInputError(ValueError):
    """Raised when a training batch holds NaN or Inf, or values so large that float32 statistics or squared
    distances overflow; the codebook and its statistics are left untouched."""


class GeometryMismatchError(ValueError):
    """Raised by a quantiser's ``load_state_dict`` when the state comes from a quantiser with another grid
    shape, topology, periodicity or neighbourhood (same K or not); nothing is loaded."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk. The message names the dataset, every path looked at and how to get it."""


class DatasetCorruptError(ValueError):
    """A dataset file is truncated, damaged or not what its layout promises (e.g. a crafted pickle); the
    one-line message names the file and the fix (replace it with an intact copy)."""


class MissingDependencyError(ImportError):
    """An optional feature needs a package that is not installed; the message says what to install."""


class DiskFullError(OSError):
    """Writing a file failed because the disk (or the user's quota) is full; names the file."""


#: the exceptions the command line reports as one ``error:`` line with exit code 2
USER_ERRORS = (ConfigError, DatasetNotFoundError, DatasetCorruptError, NonFiniteInputError, GeometryMismatchError,
               MissingDependencyError, DiskFullError)

#: errno values that mean "no space left" (disk full, quota exceeded)
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(exc: BaseException) -> bool:
    """True for an ``OSError`` whose errno says the disk or the quota is full."""
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


def disk_full_error(path, exc: OSError) -> DiskFullError:
    """A :class:`DiskFullError` naming ``path`` and the cause, for ``raise ... from exc``."""
    err = DiskFullError(exc.errno, f"disk full while writing {path} ({exc.strerror or 'no space left on device'}); "
                                   "free some space (or move the output with --out) and run the command again")
    err.filename = str(path)
    return err


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of a user error, or None if ``exc`` is not one (a bug: keep the traceback)."""
    if is_disk_full(exc) and not isinstance(exc, DiskFullError):
        where = f" while writing {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"disk full{where} ({exc.strerror or 'no space left on device'}); free some space and run again"
    if isinstance(exc, DiskFullError):
        return exc.strerror
    if isinstance(exc, USER_ERRORS):
        return str(exc)
    return None


def run_command(command: str, fn, *args) -> int:
    """``fn(*args)`` as a command-line command: its exit code, or 2 with one ``error:`` line for a user
    error, 130 on Ctrl-C. Used by ``kohonen-vae`` and every ``python -m kohonen_vae.X`` entry point."""
    try:
        return int(fn(*args) or 0)
    except KeyboardInterrupt:
        print(f"kohonen-vae {command}: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - filtered right below; anything else is re-raised
        message = user_error_message(e)
        if message is None:
            raise
        print(f"kohonen-vae {command}: error: {message}", file=sys.stderr)
        return 2
