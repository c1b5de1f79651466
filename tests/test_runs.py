"""Runs and sweeps: run folders and their identity, the options' answers, reproducibility, interruption,
prediction with a finished run, the copy unit, module boundaries, and simulate_missing.py's sweeps."""

import ast
import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import runcheck
from tests.conftest import (
    METHODS,
    ROOT,
    call,
    in_parallel,
    load,
    metrics_of,
    ok,
    on_cpu,
    optional_package,
    refused,
    run,
    run_dirs,
    write_h5,
)

#####  Run folders and identity  ###########################################################################


def test_folder_names_carry_every_option_that_can_change_the_result():
    args = common.RunArgs(
        dataset="synthetic",
        level="fine",
        seed=3,
        epochs=100,
        lr=0.005,
        dropout=0.6,
        drop_rate=0.4,
        drop_seed=7,
        out="r",
        threads=2,
        device="cpu",
        fast=True,
        data_dir="elsewhere",
    )
    args.defaults = dict(epochs=100, lr=0.001, dropout=0.6, drop_rate=0.0, drop_seed=common.DROP_SEED)
    assert common.run_name(args, "b1") == "synthetic__b1__seed3__drop0.4__dropseed7__lr0.005"


def test_same_settings_rerun_and_say_so_other_settings_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    h5 = write_h5(tmp_path / "a" / "mine.h5")
    ok(call("b1.py", "--dataset", h5, "--epochs", 1, "--out", tmp_path / "o"))
    p = ok(call("b1.py", "--dataset", h5, "--epochs", 1, "--out", tmp_path / "o", "--threads", 1, "--device", "cpu"))
    assert "holds a finished run with these settings; this run replaces it" in p.stdout
    (tmp_path / "b").mkdir()
    other = write_h5(tmp_path / "b" / "mine.h5", seed=1)  # the same file name, another file
    p = call("b1.py", "--dataset", other, "--epochs", 1, "--out", tmp_path / "o")
    refused(p, "holds a finished run made with other settings", "--dataset")
    assert "epoch" not in p.stdout


def test_the_same_file_by_another_path_is_the_same_setting_and_a_changed_file_is_not(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write_h5(tmp_path / "data" / "mine.h5")
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "data")
    ok(call("b1.py", "--dataset", "mine.h5", "--epochs", 1, "--out", tmp_path / "o"))
    monkeypatch.chdir(tmp_path / "repo")
    p = ok(call("b1.py", "--dataset", "../data/mine.h5", "--epochs", 1, "--out", tmp_path / "o"))
    assert "holds a finished run with these settings" in p.stdout
    write_h5(tmp_path / "data" / "mine.h5", seed=1, n=64)  # the same path, another file
    refused(call("b1.py", "--dataset", "../data/mine.h5", "--epochs", 1, "--out", tmp_path / "o"), "--dataset-file")


def test_a_missing_dataset_file_is_no_such_file_even_beside_an_earlier_run(tmp_path):
    h5 = write_h5(tmp_path / "mine.h5")
    ok(call("b1.py", "--dataset", h5, "--epochs", 1, "--out", tmp_path / "o"))
    h5.unlink()
    refused(call("b1.py", "--dataset", h5, "--epochs", 1, "--out", tmp_path / "o"), f"no such file: {h5}")


def test_a_run_in_progress_is_never_started_twice(tmp_path, h5):
    folder = tmp_path / "o" / "mine__b1__seed0__epochs1"
    folder.mkdir(parents=True)
    holder = subprocess.Popen(  # another process holds the run's lock, as a running run does
        [sys.executable, "-c", LOCK_HOLDER, str(folder / runcheck.LOCK_NAME)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert runcheck.run_in_progress(folder)
        refused(call("b1.py", "--dataset", h5, "--epochs", 1, "--out", tmp_path / "o"), "another process is making")
        grid = ["--dataset", h5, "--methods", "b1", "--seeds", 0, "--epochs", 1, "--out", tmp_path / "o"]
        p = call("simulate_missing.py", *grid)
        assert p.returncode == 1 and "running elsewhere" in p.stdout and "1 running elsewhere, 0 to do" in p.stdout
        assert not (folder / "metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert runcheck.run_in_progress(folder) is None  # the lock dies with its process


LOCK_HOLDER = """import fcntl, sys, time
fh = open(sys.argv[1], "a+")
fcntl.flock(fh, fcntl.LOCK_EX)
fh.write("otherhost pid 1\\n"); fh.flush()
print("locked", flush=True)
time.sleep(60)
"""


def test_the_end_of_a_run_says_what_it_left(tmp_path, h5):
    p = ok(call("mean_teacher.py", "--dataset", h5, "--epochs", 2, "--out", tmp_path))
    assert "result: network 'teacher' of epoch" in p.stdout
    assert "metrics.json (arguments, history, test metrics), model.pt" in p.stdout and "docs/metrics.md" in p.stdout
    assert not (run_dirs(tmp_path)[0] / runcheck.LOCK_NAME).exists()
    best = metrics_of(tmp_path)["best_epoch"]
    assert ("the selected epoch is the last" in p.stderr) == (best == 2)
    assert ("the result is the network of epoch 1" in p.stderr) == (best == 1)


def test_a_result_from_epoch_1_warns(tmp_path):
    p = ok(call("b0.py", "--epochs", 3, "--out", tmp_path))  # B0 on these data: its observed-label loss rises
    best = metrics_of(tmp_path)["best_epoch"]
    assert ("the result is the network of epoch 1 of 3" in p.stderr) == (best == 1)
    assert ("the selected epoch is the last" in p.stderr) == (best == 3)


@pytest.mark.optional
def test_tensorboard_logs_every_epoch_into_the_run_folder(tmp_path, h5):
    optional_package("tensorboard")
    ok(call("label_enhance.py", "--dataset", h5, "--epochs", 2, "--out", tmp_path, "--tensorboard"))
    events = list(run_dirs(tmp_path)[0].glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0])).Reload().Tags()["scalars"]
    assert {"teacher/train_loss", "teacher/val_loss", "student/lr", "student/val_loss_observed"} <= set(tags)


def test_tensorboard_missing_is_named_in_one_line(tmp_path, h5, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    refused(
        call("b1.py", "--dataset", h5, "--epochs", 1, "--out", tmp_path, "--tensorboard"), "pip install tensorboard"
    )
    assert not run_dirs(tmp_path)


@pytest.mark.optional
def test_curves_of_finished_runs_are_drawn_from_metrics_json(tmp_path, h5):
    optional_package("matplotlib")
    ok(call("b1.py", "--dataset", h5, "--epochs", 2, "--out", tmp_path / "a"))
    ok(call("mean_teacher.py", "--dataset", h5, "--epochs", 2, "--out", tmp_path / "a"))
    p = ok(run("figures.py", "curves", *run_dirs(tmp_path / "a"), "--out", tmp_path / "curves.png"))
    assert "2 run(s)" in p.stdout
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content", [b"\x89\xab raw bytes", b'{"history": "abc"}', b"[1, 2]"])
def test_curves_refuse_a_damaged_metrics_json_in_one_line(content, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_bytes(content)
    refused(run("figures.py", "curves", tmp_path / "run", "--out", tmp_path / "c.png"), "cannot read the history")


@pytest.mark.parametrize("option, hint", [("--learning_rate", "did you mean --lr?"), ("--batch_size", "--batch-size")])
def test_an_unknown_option_of_a_script_suggests_the_one_meant(option, hint, tmp_path):
    p = call("b1.py", option, 3, "--out", tmp_path)
    assert p.returncode == 2 and "unrecognized arguments" in p.stderr and hint in p.stderr


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999"])
def test_a_seed_out_of_range_is_refused_where_it_is_parsed(seed, tmp_path):
    refused(call("b1.py", "--seed", seed, "--out", tmp_path), "--seed", "a seed is a whole number from 0 to")


def test_same_seed_same_metrics_on_cpu_in_separate_processes(tmp_path):
    def strip(m):
        for e in m["history"]:
            e.pop("seconds")
        return m["history"], m["test"]

    in_parallel(lambda name: ok(run("b1.py", "--epochs", 2, "--out", tmp_path / name)), ["a", "b"])
    assert strip(metrics_of(tmp_path / "a")) == strip(metrics_of(tmp_path / "b"))
    ok(call("b1.py", "--epochs", 2, "--out", tmp_path / "c", "--seed", 1))
    assert strip(metrics_of(tmp_path / "c"))[0] != strip(metrics_of(tmp_path / "a"))[0]


def test_fast_on_cpu_says_so_and_runs_the_same_eager_run(tmp_path):
    ok(call("b1.py", "--epochs", 2, "--out", tmp_path / "a"))
    p = ok(call("b1.py", "--epochs", 2, "--out", tmp_path / "b", "--fast", "--device", "cpu"))
    assert "no CUDA device" in p.stdout
    assert metrics_of(tmp_path / "a")["test"] == metrics_of(tmp_path / "b")["test"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_a_stopped_run_leaves_no_metrics(sig, code, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "b1.py"), *on_cpu("b1.py", ["--epochs", 100, "--out", tmp_path])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's, even from a background job
    )
    for line in proc.stdout:  # wait for the first finished epoch
        if line.startswith("epoch"):
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.parametrize("method", ["b1", "mean_teacher", "selective"])
def test_methods_that_need_observed_negatives_refuse_positive_only_labels(method, tmp_path, h5):
    p = call(f"{method}.py", "--dataset", h5, "--epochs", 1, "--positive-only", "--out", tmp_path / "o")
    refused(p, f"{method}.py needs observed negatives", "have none (positive-only)", "every class")
    assert "epoch" not in p.stdout and not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("b1", "mean_teacher", "selective")])
def test_the_other_methods_train_on_positive_only_labels(method, tmp_path, h5):
    ok(call(f"{method}.py", "--dataset", h5, "--epochs", 1, "--positive-only", "--out", tmp_path))
    assert run_dirs(tmp_path)[0].name.endswith("__positive-only")


#####  Options answered in one line  #######################################################################


@pytest.mark.parametrize(
    "args, words",
    [
        (["--epochs", 0], ["--epochs", "usage:"]),
        (["--drop-rate", -0.1], ["--drop-rate"]),
        (["--dataset", "mnist"], ["--dataset"]),
        (["--lr", "abc"], ["invalid float value: 'abc'"]),
        (["--device", "cuda"], ["--device cuda", "0 cuda device(s)"]),
        (["--device", "mps"], ["--device mps"]),
        (["--device", "tpu"], ["--device tpu"]),
        (["--out", "/proc/missing-labels-test"], ["cannot write there"]),
    ],
)
def test_bad_options_stop_before_any_data_is_read(args, words, tmp_path):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("this machine has CUDA")
    p = call("b1.py", "--epochs", 1, "--out", tmp_path / "out", *args) if "--out" not in args else call("b1.py", *args)
    refused(p, *words)
    assert "data:" not in p.stdout
    assert not (tmp_path / "out").exists()


def test_a_gpu_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    """The driver counts a GPU that CUDA cannot start (busy, out of memory, a driver mismatch)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def cannot_start(device):
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable\nmore detail")

    monkeypatch.setattr(torch.cuda, "set_device", cannot_start)
    err = refused(call("b1.py", "--device", "cuda", "--out", tmp_path / "out"), "--device cuda: CUDA could not start")
    assert len(err.strip().splitlines()) == 1 and "busy or unavailable" in err
    assert not (tmp_path / "out").exists()


def test_out_below_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    refused(call("b1.py", "--out", tmp_path / "file" / "runs"), str(tmp_path / "file"))


def test_gamma_out_of_range_is_refused_and_a_share_warns(tmp_path, h5):
    refused(call("label_enhance.py", "--gamma", 150, "--out", tmp_path), "--gamma")
    p = ok(call("label_enhance.py", "--dataset", h5, "--gamma", 0.1, "--epochs", 1, "--out", tmp_path))
    assert "gamma 0.1 is a percentage: 0.1 means 0.1%, not 10%" in p.stderr


def test_more_threads_than_cores_warn(tmp_path, h5):
    p = ok(call("b1.py", "--dataset", h5, "--epochs", 1, "--threads", 4 * (os.cpu_count() or 1), "--out", tmp_path))
    assert "more than this machine's" in p.stderr
    torch.set_num_threads(os.cpu_count() or 1)


#####  Tag new clips with a finished run  ###################################################################


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    h5 = write_h5(tmp / "mine.h5")
    ok(call("mean_teacher.py", "--dataset", h5, "--epochs", 2, "--out", tmp))
    return tmp, h5, run_dirs(tmp)[0]


def test_run_files_get_the_usual_permissions(trained):
    mode = common.file_mode()
    for f in ("metrics.json", "model.pt", "test_predictions.npz"):
        assert (trained[2] / f).stat().st_mode & 0o777 == mode, f


def test_predict_reproduces_the_runs_test_scores(trained):
    tmp, h5, folder = trained
    saved = np.load(folder / "test_predictions.npz")
    p = ok(run("predict.py", folder, h5, "--out", tmp / "tags" / "tags.csv"))
    assert "mean_teacher" in p.stdout and "teacher" in p.stdout
    with open(tmp / "tags" / "tags.csv") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["clip"] + [f"tag{c}" for c in range(5)]
    row = {r[0]: np.array(r[1:], float) for r in table[1:]}
    assert np.allclose([row[k] for k in saved["keys"]], saved["scores"], atol=1e-6)


def test_load_run_from_python(trained):
    from predict import load_run

    model, meta = load_run(trained[2])
    X = load(trained[1]).test.X
    saved = np.load(trained[2] / "test_predictions.npz")
    assert np.allclose(common.predict(model, X).numpy(), saved["scores"], atol=1e-6)
    assert meta["primary"] == "teacher"


@pytest.mark.parametrize(
    "content, words",
    [
        ("truncated npz", "not an .npz"),
        ("random bytes .h5", "cannot read"),
        ("object keys", "cannot read"),
        ("metrics.json", "expected an .h5, .npz or .tfrecord file"),
        ("missing", "no such file"),
    ],
)
def test_predict_refuses_hostile_inputs_in_one_line(content, words, trained, tmp_path):
    folder = trained[2]
    good = tmp_path / "good.npz"
    np.savez(good, X=np.zeros((2, 4, 16), np.float32))
    path = dict(
        **{
            "truncated npz": tmp_path / "t.npz",
            "random bytes .h5": tmp_path / "r.h5",
            "object keys": tmp_path / "o.npz",
            "metrics.json": folder / "metrics.json",
            "missing": tmp_path / "absent.h5",
        }
    )[content]
    if content == "truncated npz":
        path.write_bytes(good.read_bytes()[:100])
    elif content == "random bytes .h5":
        path.write_bytes(os.urandom(500))
    elif content == "object keys":
        np.savez(path, X=np.zeros((2, 4, 16)), keys=np.array([{"a": 1}] * 2, dtype=object))
    refused(call("predict.py", folder, path, "--out", tmp_path / "x.csv"), words)


def test_predict_refuses_a_folder_without_a_run_or_with_a_corrupt_one(trained, tmp_path):
    refused(call("predict.py", tmp_path, trained[1], "--out", tmp_path / "x.csv"), "no model.pt")
    (tmp_path / "model.pt").write_bytes(os.urandom(300))
    refused(call("predict.py", tmp_path, trained[1], "--out", tmp_path / "x.csv"), "cannot load")


def test_predict_names_the_file_it_cannot_write(trained, tmp_path):
    (tmp_path / "tags.csv").mkdir()  # a folder where the file should go
    refused(call("predict.py", trained[2], trained[1], "--out", tmp_path / "tags.csv"), str(tmp_path / "tags.csv"))


#####  The copy unit: common.py plus one method script, alone in a folder  ###################################

# Runs the copied script three times in one process (a process costs seconds of imports), as its command line
# would: on the synthetic data, on a .h5 file, and with --dataset openmic, whose file was not copied. No POSIX-only
# module may be needed: fcntl cannot be imported here, as on Windows.
ALONE = """import runpy, sys
sys.modules["fcntl"] = sys.modules["resource"] = None
for argv in (["--epochs", "1"], ["--epochs", "1", "--dataset", "mine.h5"], ["--dataset", "openmic"]):
    sys.argv = ["{method}.py", "--out", "runs", "--device", "cpu", *argv]
    try:
        runpy.run_path("{method}.py", run_name="__main__")
    except SystemExit as e:
        print("exit", e.code)
ours = ("common", "openmic", "sonyc", "audioset", "fastpath", "runcheck", "h5guard")
print("imported from", sorted(getattr(mod, "__file__", "") for m, mod in sys.modules.items() if m in ours))
"""


@pytest.fixture(scope="module")
def copied_alone(tmp_path_factory):
    """Each method script with common.py alone in a folder, run there (2 at a time); {method: (folder, process)}."""

    def run_alone(method):
        folder = tmp_path_factory.mktemp(method)
        shutil.copy(ROOT / "common.py", folder)
        shutil.copy(ROOT / f"{method}.py", folder)
        write_h5(folder / "mine.h5")
        return folder, subprocess.run(
            [sys.executable, "-c", ALONE.format(method=method)],
            capture_output=True,
            text=True,
            cwd=folder,
            env=dict(os.environ, PYTHONPATH=""),
            timeout=300,
        )

    return dict(zip(METHODS, in_parallel(run_alone, METHODS)))


@pytest.mark.parametrize("method", METHODS)
def test_common_and_one_method_script_run_alone(method, copied_alone):
    tmp_path, p = copied_alone[method]
    assert len(run_dirs(tmp_path / "runs")) == 2, p.stdout + p.stderr
    assert p.stdout.count("exit") == 1
    assert "exit 2" in p.stdout
    assert "error: --dataset openmic needs openmic.py beside common.py" in p.stderr
    assert "h5guard.py is not beside common.py" in p.stdout and "mine.h5 is read without its guard" in p.stdout
    assert "Traceback" not in p.stderr
    assert f"imported from ['{tmp_path / 'common.py'}']" in p.stdout


def test_imports_run_one_way_and_the_dataset_modules_stand_alone():
    code = (
        "import sys; sys.modules['torch'] = sys.modules['sklearn'] = sys.modules['common'] = None; "
        "import sonyc, openmic"
    )
    ok(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT))
    local = {p.stem for p in ROOT.glob("*.py")}
    graph, top = {}, {}
    for p in ROOT.glob("*.py"):
        tree = ast.parse(p.read_text())
        imports = [(n, a.name.split(".")[0]) for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imports += [(n, n.module.split(".")[0]) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        graph[p.stem] = {name for _, name in imports} & local
        top[p.stem] = {name for n, name in imports if n in tree.body} & local

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in graph.get(a, ()))

    assert not [m for m in graph if reaches(m, m)], graph
    assert graph["sonyc"] == graph["openmic"] == graph["fastpath"] == graph["runcheck"] == graph["h5guard"] == set()
    assert top["common"] == set()  # openmic, sonyc, fastpath, runcheck, h5guard only when a run needs them
    assert all(top[m] == {"common"} for m in METHODS)


#####  Sweeps  #############################################################################################


def sweep(tmp_path, *args, methods=("b1",)):
    return [
        "--dataset",
        write_h5(tmp_path / "mine.h5"),
        "--methods",
        *methods,
        "--epochs",
        1,
        "--out",
        tmp_path / "o",
        *args,
    ]


def test_sweep_resumes_and_summarizes_mean_and_population_std(tmp_path):
    grid = sweep(tmp_path, "--rates", 0, 0.5, "--seeds", 0, 1, "--jobs", 2, "--devices", "cpu")
    p = ok(call("simulate_missing.py", *grid))
    assert "4 runs: 0 finished, 0 running elsewhere, 4 to do" in p.stdout
    assert p.stdout.count(" on cpu in ") == 4  # each run pinned to a device
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    row = next(r for r in summary["rows"] if r["rate"] == 0.5)
    f1s = [metrics_of(tmp_path / "o", f"mine__b1__seed{s}__drop0.5__epochs1")["test"]["f1_macro"] for s in (0, 1)]
    assert row["seeds"] == 2
    assert row["f1_macro"] == pytest.approx(np.mean(f1s))
    assert row["f1_macro_std"] == pytest.approx(np.std(f1s))
    assert row["per_seed"]["f1_macro"] == f1s
    assert "4 runs: 4 finished, 0 running elsewhere, 0 to do" in ok(call("simulate_missing.py", *grid)).stdout


def test_sweep_dry_run_prints_commands_that_collect_gathers(tmp_path):
    grid = sweep(tmp_path, "--rates", 0, 0.5, "--seeds", 0)
    commands = ok(call("simulate_missing.py", *grid, "--dry-run")).stdout.strip().splitlines()
    assert len(commands) == 2
    assert all(c.startswith(shlex.quote(sys.executable) + " ") and "--threads 1 --device cpu" in c for c in commands)
    assert not (tmp_path / "o").exists()
    p = call("simulate_missing.py", *grid, "--collect")
    assert p.returncode == 1 and p.stdout.count("missing: ") == 2 and not list((tmp_path / "o").rglob("*.log"))
    ok(subprocess.run(["bash", "-c", commands[0]], capture_output=True, text=True))
    p = call("simulate_missing.py", *grid, "--collect")  # one finished, one missing: a summary of what there is
    assert p.returncode == 1 and p.stdout.count("missing: ") == 1 and (tmp_path / "o" / "summary.csv").is_file()
    ok(subprocess.run(["bash", "-c", commands[1]], capture_output=True, text=True))
    p = ok(call("simulate_missing.py", *grid, "--collect"))
    assert "2 runs: 2 finished, 0 running elsewhere, 0 to do" in p.stdout and "missing" not in p.stdout


def test_dry_run_prepares_gpu_commands_on_a_machine_without_one(tmp_path):
    grid = sweep(tmp_path, "--seeds", 0, 1, 2, "--devices", "cuda:0", "cuda:1")
    commands = ok(run("simulate_missing.py", *grid, "--dry-run")).stdout.splitlines()
    assert [c.rsplit(" ", 1)[-1] for c in commands] == ["cuda:0", "cuda:1", "cuda:0"]


def test_dry_run_into_a_closed_pipe_ends_quietly(tmp_path):
    grid = " ".join(shlex.quote(str(a)) for a in sweep(tmp_path, "--seeds", 0, 1, 2, 3, "--devices", "cpu"))
    script = f"{shlex.quote(sys.executable)} simulate_missing.py {grid} --dry-run | head -1"
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert len(p.stdout.splitlines()) == 1 and "Traceback" not in p.stderr


def test_the_same_sweep_from_two_folders_reuses_its_runs_and_writes_one_summary(tmp_path):
    (tmp_path / "mydata").mkdir()
    (tmp_path / "repo").mkdir()
    write_h5(tmp_path / "mydata" / "my_tags.h5")
    grid = ["--methods", "b1", "--seeds", 0, "--epochs", 1, "--devices", "cpu"]
    ok(run("simulate_missing.py", "--dataset", "my_tags.h5", "--out", "sweep", *grid, cwd=tmp_path / "mydata"))
    p = ok(
        run(
            "simulate_missing.py",
            *["--dataset", "../mydata/my_tags.h5", "--out", "../mydata/sweep", *grid],
            cwd=tmp_path / "repo",
        )
    )
    assert "1 runs: 1 finished, 0 running elsewhere, 0 to do" in p.stdout
    sweep_folder = tmp_path / "mydata" / "sweep"  # paths meant what they mean where the first was typed
    assert len(list(sweep_folder.glob("summary-*.json"))) == 1 and (sweep_folder / "summary.csv").is_file()
    assert [p.name for p in (sweep_folder / "logs").iterdir()] == ["my_tags__b1__seed0__epochs1.log"]
    assert metrics_of(sweep_folder)["args"]["threads"] == 1


def test_sweep_varies_any_option_and_tables_it(tmp_path):
    ok(call("simulate_missing.py", *sweep(tmp_path, "--vary", "lr=0.001,0.005", "--seeds", 0, 1, "--jobs", 2)))
    names = sorted(p.name for p in run_dirs(tmp_path / "o"))
    assert names == [
        "mine__b1__seed0__epochs1",
        "mine__b1__seed0__epochs1__lr0.005",
        "mine__b1__seed1__epochs1",
        "mine__b1__seed1__epochs1__lr0.005",
    ]
    with open(tmp_path / "o" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["lr"] for r in rows] == ["0.001", "0.005"]


def test_an_option_of_some_methods_reaches_only_those(tmp_path):
    grid = sweep(tmp_path, "--seeds", 0, "--ema-decay", 0.99, "--jobs", 2, methods=("b1", "mean_teacher"))
    ok(call("simulate_missing.py", *grid))
    assert sorted(p.name for p in run_dirs(tmp_path / "o")) == [
        "mine__b1__seed0__epochs1",
        "mine__mean_teacher__seed0__epochs1__ema-decay0.99",
    ]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--rate", 0, 0.4], ["--rate", "did you mean --rates"]),
        (["--ema-decay", 0.9], ["--ema-decay: no option of the sweep or of b1"]),
        (["--seed", 1], ["--seed: the sweep sets this itself"]),
        (["--drop-rate", 0.4], ["--drop-rate: the sweep sets this itself"]),
        (["--gamma=50"], ["--gamma: no option"]),
        (["--vary", "lr"], ["--vary lr: expected NAME=V1,V2"]),
        (["--vary", "lr=abc"], ["b1.py: argument --lr: invalid float value: 'abc'"]),
        (["--vary", "lr=0.01", "--lr", 0.1], ["--lr is both varied and passed through"]),
        (["--devices", "cpu", "--device", "cpu"], ["--device: the sweep sets this itself"]),
        (["--vary", "learning_rate=0.01"], ["--learning-rate: no option", "did you mean --lr?"]),
        (["--batch_size", 32], ["did you mean --batch-size?"]),
        (["--vary", "dropout=0.1", "--vary", "dropout=0.2"], ["--vary dropout is given twice"]),
        (["--seeds", -1], ["--seeds", "a seed is a whole number"]),
        (["--drop-per-seed", "--drop-seed", 7], ["--drop-per-seed sets each run's --drop-seed", "give one of the two"]),
        (["--drop-seed", "fixed"], ["b1.py: argument --drop-seed: invalid seed_arg value: 'fixed'"]),
    ],
)
def test_sweep_refuses_what_it_cannot_run_by_name(args, words, tmp_path):
    refused(call("simulate_missing.py", *sweep(tmp_path, "--seeds", 0, *args)), *words)
    assert not (tmp_path / "o").exists()


def drop_seeds(p):
    """The --drop-seed of each command that a --dry-run printed."""
    return [shlex.split(line)[shlex.split(line).index("--drop-seed") + 1] for line in ok(p).stdout.splitlines()]


def test_drop_seed_means_one_thing_in_the_sweep_and_the_scripts(tmp_path):
    grid = sweep(tmp_path, "--rates", 0.5, "--seeds", 0, 1, "--dry-run")
    assert drop_seeds(call("simulate_missing.py", *grid, "--drop-seed", 7)) == ["7", "7"]  # passed through
    assert drop_seeds(call("simulate_missing.py", *grid, "--drop-per-seed")) == ["0", "1"]  # each training seed


def test_sweep_with_runs_made_with_other_settings_is_refused(tmp_path):
    grid = sweep(tmp_path, "--seeds", 0)
    ok(call("simulate_missing.py", *grid))
    folder = run_dirs(tmp_path / "o")[0]
    m = json.loads((folder / "metrics.json").read_text())
    m["args"]["batch_size"] = 32  # as if the defaults had changed since
    (folder / "metrics.json").write_text(json.dumps(m))
    refused(call("simulate_missing.py", *grid), "1 finished run(s)", "--batch-size 32 -> 64")


def test_failed_sweeps_leave_earlier_summaries_as_they_were(tmp_path):
    grid = sweep(tmp_path, "--seeds", 0)
    ok(call("simulate_missing.py", *grid))
    before = (tmp_path / "o" / "summary.csv").read_bytes()
    if not torch.cuda.is_available():
        refused(call("simulate_missing.py", *sweep(tmp_path, "--seeds", 1, "--device", "cuda")), "--device cuda")
    (tmp_path / "broken.h5").write_bytes(os.urandom(400))  # every run fails when it loads the data
    p = call(
        "simulate_missing.py",
        "--dataset",
        tmp_path / "broken.h5",
        "--methods",
        "b1",
        "--seeds",
        0,
        "--out",
        tmp_path / "o",
    )
    refused(p, "all 1 run(s) of this sweep failed", "no summary written")
    assert (tmp_path / "o" / "summary.csv").read_bytes() == before


@pytest.mark.optional
def test_sweep_figures_are_kept_per_sweep_and_say_what_they_show(tmp_path):
    optional_package("matplotlib")
    import figures

    grid = sweep(tmp_path, "--rates", 0, 0.5, "--seeds", 0, "--jobs", 2, "--plot", methods=("b1", "b0"))
    ok(call("simulate_missing.py", *grid))
    (sweep_id,) = [p.stem.removeprefix("summary-") for p in (tmp_path / "o").glob("summary-*.json")]
    for fig in (f"fig4-{sweep_id}.png", f"fig5-{sweep_id}.png", "fig4.png", "fig5.png"):
        assert (tmp_path / "o" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    metrics = figures.paper_metrics(summary)
    assert metrics == dict(fig4="f1_macro", fig5="auprc_macro_masked")  # the paper's F1 and AUPRC
    plotted = figures.fig4(summary, tmp_path / "f4.png", metrics["fig4"])
    assert list(plotted) == ["B0", "B1"]  # the paper's names
    b1_at_0 = next(r for r in summary["rows"] if r["method"] == "b1" and r["rate"] == 0)
    assert plotted["B1"] == b1_at_0["per_seed"]["f1_macro"]
    rates, means, _ = figures.fig5(summary, tmp_path / "f5.png", metrics["fig5"])["B1"]
    rows = [r for r in summary["rows"] if r["method"] == "b1"]
    assert means == [r["auprc_macro_masked"] for r in rows]  # Fig. 5: AUPRC
    assert rates == [0, 0.5]
    ok(call("simulate_missing.py", *grid, "--metric", "f1_macro"))
    assert (tmp_path / "o" / f"fig5-{sweep_id}-f1_macro.png").is_file()
    refused(call("simulate_missing.py", *grid, "--metric", "nope"), "--metric nope")


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    grid = sweep(tmp_path, "--seeds", 0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    p = call("simulate_missing.py", *grid, "--plot")
    refused(p, "pip install matplotlib")
    assert (tmp_path / "o" / "summary.json").is_file()


def test_gpu_check_arguments(tmp_path):
    def sh(*a):
        return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *a], capture_output=True, text=True)

    assert sh("--bogus").returncode == 2
    if not torch.cuda.is_available():
        p = sh("--python", sys.executable)
        assert p.returncode == 2 and "no CUDA device" in p.stderr
