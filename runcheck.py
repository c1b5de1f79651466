"""runcheck.py: what a sweep or a cluster needs of a run folder, beyond the copy unit (common.py + a method script):

- identity: a finished run's recorded settings against a requested run's (config_diff, finished_run_diff), so
  that a finished run is replaced only with its own settings, and a sweep reruns nothing finished;
- locks: while a run is made its folder holds running.lock, locked by the process (fcntl.flock; the lock ends
  with the process, however it ends), so a run is never started twice (a second process, a sweep, a cluster
  job); run_in_progress says who holds it;
- spelling hints for an unknown option (did_you_mean), for the scripts and the sweep.

common.claim_run_dir uses this file when it is there, as in the repository. A method script copied with
common.py alone runs without it: no lock, no identity check (a finished run in the same folder is replaced, as
the script says), no hints. POSIX only for the lock: where fcntl is missing (Windows) runs are not locked.
Like the dataset readers it imports nothing of this project: imports run one way, into common.py. Its refusals
are RunError, which common.py reports in one line.
"""

import difflib
import json
import os
import platform
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None


class RunError(Exception):
    """A run that must not start (another's settings, or in progress elsewhere): one line, exit 2."""


LOCK_NAME = "running.lock"
_lock = {}  # the lock file this process holds open while it makes its run


#####  Identity  ###################################################################################


def plain(values):
    """A dict of settings as its JSON record reads back (a tuple as a list, a path as a string)."""
    return json.loads(json.dumps(dict(values), default=str))


def config_diff(recorded, requested, defaults, ignore=()):
    """What differs between a finished run's arguments and a requested run's, apart from the options `ignore`
    (common.NOT_IDENTITY); '' when they match. An option one of them lacks (a run made before the option
    existed) counts at its default; dataset_file is compared only when both record it."""
    a, b, defaults = plain(recorded), plain(requested), plain(defaults)
    differences = []
    for key in sorted((set(a) | set(b)) - set(ignore)):
        if key == "dataset_file" and not (key in a and key in b):
            continue
        old, new = a.get(key, defaults.get(key, "(unset)")), b.get(key, defaults.get(key, "(unset)"))
        if old != new:
            differences.append(f"--{key.replace('_', '-')} {old} -> {new}")
    return ", ".join(differences)


def finished_run_diff(folder, args, ignore=()):
    """'' when `folder` holds a finished run made with `args`' settings (apart from `ignore`), else what differs."""
    try:
        recorded = json.loads((Path(folder) / "metrics.json").read_text()).get("args", {})
        return config_diff(recorded, vars(args), args.defaults, ignore)
    except (OSError, ValueError, AttributeError) as e:
        return f"unreadable: {e}"


def check_identity(folder, args, ignore=()):
    """Refuse, before training, to replace a finished run made with other settings."""
    if (folder / "metrics.json").is_file():
        diff = finished_run_diff(folder, args, ignore)
        if diff:
            raise RunError(
                f"{folder} holds a finished run made with other settings ({diff}); "
                f"use another --out, or delete that folder to replace it"
            )


#####  Locks  ######################################################################################


def run_in_progress(folder):
    """Who is making the run in `folder` now ('host pid N'), or None: its lock file is locked by a live process."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return None
    try:
        with open(path, "r+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
    except BlockingIOError:
        return path.read_text(errors="replace").strip()[:200] or "another process"
    except OSError:
        return None
    return None


def lock(folder):
    """Hold `folder`'s running.lock until unlock (or this process ends); a run another process is making now
    is refused in one line."""
    if fcntl is None:
        return
    try:
        fh = open(folder / LOCK_NAME, "a+")
    except OSError as e:
        raise RunError(f"cannot make {folder / LOCK_NAME} ({e})")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise RunError(
            f"{folder}: another process is making this run now ({run_in_progress(folder)}); wait for it to end"
        )
    fh.seek(0)
    fh.truncate()
    fh.write(f"{platform.node()} pid {os.getpid()}\n")
    fh.flush()
    _lock.update(folder=folder, file=fh)


def unlock():
    """Release the lock this process holds, and remove its file."""
    if not _lock:
        return
    _lock.pop("file").close()
    (_lock.pop("folder") / LOCK_NAME).unlink(missing_ok=True)


#####  Spelling hints  #############################################################################

# Names users try for an option, and the option they mean (the closest name by spelling comes after these).
COMMON_SPELLINGS = {
    "learning-rate": "lr",
    "learningrate": "lr",
    "batch": "batch-size",
    "batchsize": "batch-size",
    "bs": "batch-size",
    "epoch": "epochs",
    "num-epochs": "epochs",
    "n-epochs": "epochs",
    "alpha": "ema-decay",
    "ema": "ema-decay",
    "beta": "consistency-weight",
    "n-layers": "layers",
    "hidden-size": "hidden",
}


def did_you_mean(name, known):
    """'; did you mean --lr?' for an unknown option name, from its common spellings, else the closest names."""
    key = name.lstrip("-").replace("_", "-").lower()
    if f"--{COMMON_SPELLINGS.get(key)}" in known:
        return f"; did you mean --{COMMON_SPELLINGS[key]}?"
    close = difflib.get_close_matches(f"--{key}", sorted(known), n=2)
    return f"; did you mean {' or '.join(close)}?" if close else ""
