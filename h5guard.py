"""The guard of the .h5 reader: HDF5 can loop or crash in C on a damaged file, out of Python's reach (a flipped
bit in a variable-length string attribute made it loop forever: benchmarks/fuzz.py). So before a run reads an
.h5 file, a child process reads all of it (every attribute, and every dataset block by block without keeping
the blocks), and a child that is killed is one line: "the HDF5 library hung or crashed reading it".

The child's limit is CPU time, not wall time: a loop burns CPU, slow storage does not (a child waiting on a
network file system uses almost none), so a valid file is never refused for being slow to read. The budget,
CPU_SECONDS plus one second per CPU_BYTES_PER_SECOND of file, is about a hundred times what reading takes here.
Where the resource module is missing (Windows) the child runs without a limit: a file on which HDF5 loops then
hangs the run until Ctrl-C, as it would without the guard.

common.load_h5 and predict.py use this file when it is there, as in the repository; a method script copied with
common.py alone reads .h5 files without it, and says so. It imports nothing of this project.
"""

import inspect
import subprocess
import sys

CPU_SECONDS = 30  # the child's CPU budget: its start and imports take about 0.3 s
CPU_BYTES_PER_SECOND = 10e6  # plus a second per 10 MB of file (reading takes about 0.1 s per 10 MB here)


def read_every_byte(path, cpu_limit):
    """Run in a child process by probe, from this source: limit its CPU time, open the file, read every
    attribute and, block by block without keeping them, every dataset that fits in memory."""
    import os

    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, cpu_limit + 5))  # SIGXCPU, then SIGKILL
    except (ImportError, ValueError, OSError):
        pass  # no limit here (Windows)
    import h5py

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else float("inf")

    def visit(name, obj):
        for key in obj.attrs:
            obj.attrs[key]
        if not isinstance(obj, h5py.Dataset) or (obj.nbytes or 0) > memory:
            return
        if not obj.shape:
            obj[()]
            return
        for i in range(0, len(obj), 65536):
            obj[i : i + 65536]

    with h5py.File(path, "r") as f:
        visit("/", f)
        f.visititems(visit)


def probe(path):
    """Read `path` in a child process first. Returns None, or the one-line refusal if the child was killed (a
    loop past its CPU budget, or a crash); an exception in the child is left to the reader's own message."""
    reader = read_every_byte
    program = f"{inspect.getsource(reader)}\nimport sys\n{reader.__name__}(sys.argv[1], int(sys.argv[2]))\n"
    cpu_limit = int(CPU_SECONDS + path.stat().st_size / CPU_BYTES_PER_SECOND)
    child = subprocess.run([sys.executable, "-c", program, str(path), str(cpu_limit)], capture_output=True)
    if child.returncode < 0:  # killed by a signal: SIGXCPU or SIGKILL past the budget, SIGSEGV, SIGABRT
        return (
            f"cannot read {path}: the HDF5 library hung or crashed reading it (in a child process, limited to "
            f"{cpu_limit} s of CPU): a damaged file?"
        )
    return None
