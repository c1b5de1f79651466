"""The four readers under random corruption (benchmarks/fuzz.py, fewer cases): every case must load valid
data as an independent reader reads it, or stop with the one-line error; never a traceback, a hang, or
invalid or wrong data loaded."""

import pytest

from benchmarks import fuzz


@pytest.mark.parametrize("reader", fuzz.READERS)
def test_random_corruptions_load_valid_data_or_stop_in_one_line(reader, tmp_path):
    failures = []
    counts = fuzz.fuzz(reader, 100, seed=2024, work=tmp_path, report=lambda v, w: failures.append(f"{v} <- {w}"))
    assert failures == []
    assert counts.get("loaded", 0) > 10  # the corruptions leave some files valid ...
    assert counts.get("clean error", 0) > 40  # ... and break most
