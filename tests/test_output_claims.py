"""Output claiming (napari_mias_sam.core.atomic_outputs): which leftovers the sweep removes and which it
keeps, locks between output sets, exclusive final names, and a dead run's commit finished."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from napari_mias_sam.core.errors import InputError
from napari_mias_sam.core.atomic_outputs import (
    HOST_TAG,
    STALE_AFTER_S,
    OutputBusyError,
    OutputSet,
    check_output_folder,
    sweep_stale,
)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def make(folder, name: str, *, age: float = 0.0, is_dir: bool = False):
    p = folder / name
    if is_dir:
        p.mkdir()
        (p / "index.faiss").write_bytes(b"x" * 10)
    else:
        p.write_bytes(b"partial")
    if age:
        t = time.time() - age
        os.utime(p, (t, t))
    return p


def test_sweep_removes_only_leftovers_of_dead_or_old_runs(tmp_path):
    dead, live = dead_pid(), os.getpid()
    gone = [
        make(tmp_path, f".a_mask.nii.gz.mias-{HOST_TAG}-{dead}-0a1b2c3d.part.nii.gz"),
        make(tmp_path, f".bank.mias-{HOST_TAG}-{dead}-0a1b2c3e.part", is_dir=True),
        make(tmp_path, f".b.csv.mias-0f0f0f-123-0a1b2c3f.part.csv", age=STALE_AFTER_S + 60),  # another host, old
        make(tmp_path, ".c.csv.abcd_123.part.csv", age=STALE_AFTER_S + 60),  # an older version's name, old
    ]
    kept = [
        make(tmp_path, f".d.csv.mias-{HOST_TAG}-{live}-0a1b2c40.part.csv"),  # this (live) process
        make(tmp_path, f".e.csv.mias-0f0f0f-123-0a1b2c41.part.csv"),  # another host, recent: cannot tell
        make(tmp_path, ".f.csv.abcd_124.part.csv"),  # an older version's name, recent
        make(tmp_path, "results.csv"),
        make(tmp_path, ".hidden_of_the_user"),
    ]
    removed = sweep_stale(tmp_path)
    assert sorted(removed) == sorted(gone)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in gone)


def test_sweep_puts_back_an_old_bank_whose_replacement_never_arrived(tmp_path):
    old = make(tmp_path, f".bank.mias-{HOST_TAG}-{dead_pid()}-0a1b2c3d.old", is_dir=True)
    sweep_stale(tmp_path)
    assert not old.exists() and (tmp_path / "bank" / "index.faiss").read_bytes() == b"x" * 10


def test_two_claims_on_the_same_names_and_different_names(tmp_path):
    with OutputSet(tmp_path, ["a.csv"]) as first:
        with pytest.raises(OutputBusyError, match=f"process {os.getpid()}"):
            OutputSet(tmp_path, ["a.csv"]).claim()
        with OutputSet(tmp_path, ["b.csv"], lock_name="b") as other:  # another set: independent
            other.temp("b.csv").write_text("b")
            other.commit()
        first.temp("a.csv").write_text("a")
        first.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]


def test_a_name_that_appears_meanwhile_is_never_replaced_and_the_set_is_not_half_kept(tmp_path):
    outs = OutputSet(tmp_path, ["x.csv", "y.csv"]).claim()
    outs.temp("x.csv").write_text("mine x")
    outs.temp("y.csv").write_text("mine y")
    (tmp_path / "y.csv").write_text("someone else's")
    with pytest.raises(InputError, match="appeared while this run was writing"):
        outs.commit()
    outs.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.csv"]
    assert (tmp_path / "y.csv").read_text() == "someone else's"


def test_a_dead_runs_commit_is_finished_by_the_next_claim(tmp_path):
    tmps = {n: make(tmp_path, f".{n}.mias-{HOST_TAG}-{dead_pid()}-0a1b2c3d.part.csv") for n in ("p.csv", "q.csv")}
    (tmp_path / "p.csv").write_bytes(b"partial")  # it had moved the first one
    tmps["p.csv"].unlink()
    journal = {"pid": 1, "host": "h", "commit": [{"tmp": str(t), "final": str(tmp_path / n), "old": None} for n, t in tmps.items()]}
    (tmp_path / ".p.mias-sam.lock").write_text(json.dumps(journal))
    with OutputSet(tmp_path, ["other.csv"]) as outs:  # another set's claim sweeps the folder
        assert outs.claimed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "q.csv"]


def test_check_output_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="is an existing file"):
        check_output_folder(f)
    with pytest.raises(InputError, match="lies under"):
        check_output_folder(f / "a" / "b")
    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
