"""The run directory: which files are ours, who may write them, and when a run may start or resume.

Guarantees (docs/training.md, "Run directories"):

* **Ours only.** A run writes the files in :data:`RUN_FILES` (and ``tensorboard/``) and nothing else, and
  only into a folder that is new, empty, or already one of our runs (it carries the marker file
  :data:`MARKER`, or, for runs of earlier versions, ``config.json`` beside ``checkpoints/last.pt``). A
  folder holding anything else is refused before anything is written into it.
* **One writer.** Rank 0 holds an exclusive lock (``flock`` on :data:`LOCK`) for the whole run; a second
  run into the same folder is refused at once. The lock dies with its process, so a ``kill -9`` leaves
  no stale lock behind.
* **Exact resume or none.** ``--resume`` continues from ``checkpoints/last.pt`` after verifying its
  checksum. It refuses, changing nothing, when the config differs in a key that changes the computation,
  when ``max_steps`` is below the steps already done, or when ``last.pt`` is missing or damaged while
  other checkpoints or the summary of the run exist (its predecessor ``last.prev.pt`` is offered with
  ``--resume-from previous``). A run of ours that never saved a checkpoint (a start that failed, or a
  kill before the first checkpoint) starts again from step 0 with ``--resume``; without ``--resume`` a
  folder with any results is refused.
* **No litter.** Temporary files that a killed write left behind are deleted when the run starts; only
  names of exactly our temporary-file pattern are touched.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path

from ..errors import CheckpointError, ConfigError, ResumeError
from ..fileio import atomic_write_json, remove_stale_temp_files
from .checkpoint import load_checkpoint, previous_path, read_metrics
from .config import RESUMABLE_CHANGES, changed_keys, resolve_saved_config

try:  # POSIX; elsewhere the run directory is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

#: marks a folder as a kohonen-vae run (JSON: version, creation time)
MARKER = ".kohonen-vae-run"
#: the lock file rank 0 holds while it trains (JSON: pid, host, start time)
LOCK = ".kohonen-vae.lock"
#: every file a run writes, relative to the run directory (plus the folder tensorboard/)
RUN_FILES = ("config.json", "data.json", "metrics.jsonl", "summary.json", "report.html", MARKER, LOCK,
             "checkpoints/last.pt", "checkpoints/last.prev.pt", "checkpoints/best.pt")


def is_our_run(folder: Path) -> bool:
    """True if ``folder`` carries our marker, or is a run of an earlier version (``config.json`` and
    ``checkpoints/last.pt`` or ``metrics.jsonl``, nothing foreign needed to tell)."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return True
    return (folder / "config.json").is_file() and ((folder / "checkpoints" / "last.pt").is_file()
                                                   or (folder / "metrics.jsonl").is_file())


def foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that no run writes (relative names), e.g. a user's own files."""
    folder = Path(folder)
    ours_top = {Path(f).parts[0] for f in RUN_FILES} | {"tensorboard"}
    ours_ckpt = {Path(f).name for f in RUN_FILES if f.startswith("checkpoints/")}
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            continue  # our own temporary files (and only ours are ever deleted)
        if p.name not in ours_top:
            out.append(p.name)
        elif p.name == "checkpoints" and p.is_dir():
            out += [f"checkpoints/{c.name}" for c in sorted(p.iterdir())
                    if c.name not in ours_ckpt and not (c.name.startswith(".") and c.name.endswith(".tmp"))]
    return out


class RunLockedError(ResumeError):
    """Another process is training into the same run directory."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``folder/.kohonen-vae.lock``, released on :meth:`release` or
    when the process ends (also by kill -9: the kernel drops the lock with the file descriptor)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self._fd = None

    def acquire(self) -> "RunLock":
        if fcntl is None:  # pragma: no cover
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
                holder = f" (pid {info.get('pid')} on {info.get('host')}, since {info.get('started')})"
            except (OSError, ValueError):
                pass
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by another kohonen-vae run{holder}; wait for it "
                                 "to finish or choose another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the (empty of meaning) file stays, it is ours
            self._fd = None


class RunDirectory:
    """A run directory being set up by rank 0: :meth:`open` checks and locks it, :meth:`checkpoint_to_resume`
    decides what to resume from, :meth:`abandon` removes what a failed start created, :meth:`close` unlocks."""

    def __init__(self, path):
        self.path = Path(path)
        self.lock = RunLock(self.path)
        self.created = False        # this call created the folder
        self.marked = False         # this call wrote the marker

    def open(self, resume: bool) -> "RunDirectory":
        """Refuse a folder that is a file or holds someone else's files; create and lock ours."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file, not a folder; give a folder for the run")
        if out.is_dir():
            foreign = foreign_entries(out)
            if foreign and not is_our_run(out):
                shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
                raise ResumeError(f"{out} is not empty and not a kohonen-vae run (it holds {shown}); a run only "
                                  "writes into a new or empty folder, or continues its own: choose another --out")
        else:
            try:
                out.mkdir(parents=True)
            except FileExistsError:
                pass
            else:
                self.created = True
        self.lock.acquire()
        remove_stale_temp_files(out, [Path(f).name for f in RUN_FILES if "/" not in f])
        remove_stale_temp_files(out / "checkpoints", ["last.pt", "last.prev.pt", "best.pt"])
        if not (out / MARKER).is_file():
            atomic_write_json(out / MARKER, {"kohonen_vae_run": 1,
                                             "created": datetime.datetime.now().isoformat(timespec="seconds")})
            self.marked = True
        return self

    def has_results(self) -> list[str]:
        """The files of earlier training in this folder (checkpoints, metrics records, summary)."""
        out = self.path
        found = [f for f in ("checkpoints/last.pt", "checkpoints/last.prev.pt", "checkpoints/best.pt", "summary.json")
                 if (out / f).is_file()]
        if (out / "metrics.jsonl").is_file() and read_metrics(out / "metrics.jsonl", warn=lambda m: None):
            found.append("metrics.jsonl")
        return found

    def checkpoint_to_resume(self, cfg: dict, resume: bool, resume_from: str = "last"):
        """The checkpoint dict to continue from, or None to start from step 0; raises ResumeError (nothing
        changed) when the run cannot continue exactly as asked."""
        out = self.path
        if resume_from not in ("last", "previous"):
            raise ConfigError(f"--resume-from must be 'last' or 'previous', got {resume_from!r}")
        results = self.has_results()
        if not resume:
            if results:
                raise ResumeError(f"{out} already holds a run ({', '.join(results)}); pass --resume to continue it "
                                  "or choose another --out")
            return None
        last = out / "checkpoints" / "last.pt"
        source = previous_path(last) if resume_from == "previous" else last
        if not source.is_file():
            if not [r for r in results if r != "metrics.jsonl"]:
                # no checkpoint of any kind was saved (killed early, or a failed start): nothing can continue,
                # so start from step 0 (job scripts may always pass --resume); only our log is replaced
                if results:
                    print(f"note: {out} holds no checkpoint yet; starting it from step 0", file=sys.stderr)
                return None
            hint = ""
            if source == last and previous_path(last).is_file():
                hint = (f"; its predecessor {previous_path(last)} is there: continue from it with "
                        "--resume --resume-from previous")
            raise ResumeError(f"cannot resume {out}: {source.relative_to(out)} is missing but the run has other "
                              f"results ({', '.join(results)}); starting over would replace them{hint}")
        ckpt = load_checkpoint(source)
        changed = [k for k in changed_keys(resolve_saved_config(ckpt["config"]), cfg) if k not in RESUMABLE_CHANGES]
        if changed:
            raise ResumeError(f"cannot resume {out}: the config differs from the saved one in {', '.join(changed)}. "
                              f"Only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume")
        if cfg["train"]["max_steps"] < ckpt["step"]:
            raise ResumeError(f"cannot resume {out}: train.max_steps = {cfg['train']['max_steps']} is below the "
                              f"{ckpt['step']} steps already done; set max_steps >= {ckpt['step']}")
        return ckpt

    def abandon(self) -> None:
        """After a failed start: remove the marker and lock if this call marked the folder, and the folder if
        this call created it and it is then empty. Files of earlier runs and anything else are left alone."""
        self.close()
        if not self.marked:
            return
        for name in (LOCK, MARKER):
            try:
                (self.path / name).unlink()
            except FileNotFoundError:
                pass
        if self.created:
            try:
                self.path.rmdir()  # only if empty
            except OSError:
                pass

    def close(self) -> None:
        self.lock.release()


__all__ = ["RunDirectory", "RunLock", "RunLockedError", "is_our_run", "foreign_entries", "MARKER", "LOCK",
           "RUN_FILES", "CheckpointError"]
