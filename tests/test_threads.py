"""The CLI's threads (spannorm.threads): the usable cores less those other processes keep busy, at least one; a
user's choice (train.threads, OMP_NUM_THREADS) wins. The measurement behind it: scripts/threads_load.py."""

import os

import pytest
import torch

from spannorm import threads
from spannorm.cli import main


@pytest.mark.parametrize("busy, want", [(0.0, 2), (0.4, 2), (0.6, 1), (1.0, 1), (2.0, 1), (3.5, 1)])
def test_fit_threads_leaves_the_busy_cores_to_others(monkeypatch, busy, want):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: busy)
    assert threads.fit_threads() == want


def test_busy_cores_is_the_busy_share_of_the_machine_over_the_sample(monkeypatch):
    samples = iter([(1000, 4000), (1150, 4200)])  # (busy, total) jiffies: 150 of 200 busy
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert threads.busy_cores(0.0) == pytest.approx(3.0)
    monkeypatch.setattr(threads, "_cpu_times", lambda: None)  # (no /proc/stat: nothing known to be busy)
    assert threads.busy_cores(0.0) == 0.0


def test_a_cgroup_quota_caps_the_usable_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 cores -> 2 at most
    assert threads.usable_cores(tmp_path / "cpu.max") == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert threads.usable_cores(tmp_path / "cpu.max") == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.usable_cores(tmp_path / "cpu.max") == len(os.sched_getaffinity(0))


def test_the_cli_fits_its_threads_unless_the_user_chose(corpus, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    probe = ["probe", "--config", "tiny", "--corpus", str(corpus), "--scheme", "pre", "--depths", "2"]
    probe += ["--json", str(tmp_path / "probe.json")]
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.0)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(1)
        assert main(probe) == 0
        assert torch.get_num_threads() == 3  # 4 usable, 1 busy
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # (the user's choice: left as it is)
        torch.set_num_threads(1)
        assert main(probe) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
