"""Shared helpers and fixtures: running a script as a user would (on the CPU), and the small datasets of
benchmarks/fixtures.py, one per test."""

import concurrent.futures
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import common
from benchmarks.fixtures import (  # noqa: F401  (re-exported to the tests)
    OPENMIC_CLASSES,
    SONYC_COARSE,
    SONYC_FINE,
    SONYC_ROWS,
    HugeArray,
    Payload,
    read_openmic_npz,
    write_h5,
    write_openmic,
    write_scaled_h5,
    write_sonyc,
)

ROOT = Path(__file__).resolve().parent.parent

METHODS = ["b0", "b1", "label_enhance", "mean_teacher", "le_mean_teacher", "large_loss", "selective", "em", "gr_loss"]


# CI's second part installs the optional packages and sets this: there a test marked `optional` must run, and a
# missing package fails it instead of skipping it.
REQUIRE_OPTIONAL = os.environ.get("MISSING_LABELS_REQUIRE_OPTIONAL") == "1"


def optional_package(name):
    """The optional package `name` (matplotlib, tensorboard), or a skip that names it and how to install it."""
    if REQUIRE_OPTIONAL:
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is optional (pip install {name}); CI's second part installs it")


DEVICE_OPTION = {"simulate_missing.py": "--devices", "predict.py": "--device"}


def on_cpu(script, args):
    """`args` with the CPU named, unless the test names a device itself: the suite gives the same answers on a
    machine with a GPU (where the scripts' own default is CUDA); only the CUDA tests use one."""
    args = [str(a) for a in args]
    name = Path(script).name
    option = DEVICE_OPTION.get(name, "--device" if name.removesuffix(".py") in METHODS else None)
    if option and not {"--device", "--devices", "-h", "--help"} & set(args):
        args += [option, "cpu"]
    return args


def run(script, *args, timeout=300, cwd=ROOT, env=None):
    """Run a script as a user would, in its own process, on the CPU (on_cpu); returns the CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS="default", **(env or {}))
    path = script if Path(script).is_absolute() else ROOT / script
    return subprocess.run(
        [sys.executable, str(path), *on_cpu(script, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def in_parallel(function, items, jobs=2):
    """function(item) for every item, `jobs` at a time (the machine's 2 cores), in order: for tests whose
    subject is a process of its own."""
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(function, items))


def call(script, *args):
    """Run a script's main() in this process, as its command line would (a process costs seconds of
    imports). Returns a CompletedProcess-like (returncode, stdout, stderr)."""
    module = importlib.import_module(script.removesuffix(".py"))
    out, err, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    sys.argv = [script, *on_cpu(script, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")
            common.main_guard(module.main)
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(script, code, out.getvalue(), err.getvalue())


def ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def refused(p, *words):
    """A user error: exit status 2, one line on stderr, no traceback, naming each of `words`."""
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in p.stderr, (w, p.stderr)
    return p.stderr


def run_dirs(out):
    return sorted(p.parent for p in Path(out).glob("*/metrics.json"))


def metrics_of(out, name=None):
    """metrics.json of the run `name` in `out`, or of the only run there."""
    if name is None:
        folders = run_dirs(out)
        assert len(folders) == 1, folders
        return json.loads((folders[0] / "metrics.json").read_text())
    return json.loads((Path(out) / name / "metrics.json").read_text())


def load(dataset, data_dir=".", level="fine", drop_rate=0.0, drop_seed=common.DROP_SEED, positive_only=False, **more):
    """common.load_dataset as a script calls it, on the CPU."""
    args = Namespace(
        dataset=str(dataset),
        data_dir=str(data_dir),
        level=level,
        drop_rate=drop_rate,
        drop_seed=drop_seed,
        positive_only=positive_only,
        **more,
    )
    return common.load_dataset(args, torch.device("cpu"))


#####  The datasets of benchmarks/fixtures.py, one per test  #####################################################


@pytest.fixture
def openmic(tmp_path):
    return write_openmic(tmp_path)


@pytest.fixture
def h5(tmp_path):
    return write_h5(tmp_path / "mine.h5")


@pytest.fixture
def sonyc(tmp_path):
    return write_sonyc(tmp_path)
