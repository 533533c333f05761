"""--dask (napari_mias_sam.scale) on a LocalCluster of two worker processes on 127.0.0.1: a bank
built by two workers is the serial bank (patches, search results, calibration), for files and for a
BraTS-shaped root in two shards; a two-shard bank gives one shard's neighbours and masks;
``segment`` of several volumes and ``evaluate`` give the serial results; a worker killed by its pid
during a build still yields the identical bank; without --dask nothing imports Dask's scheduler; a
wrong address is a one-line error before anything is written; a plan that does not fit is refused.

The fake backbone (tests/fakes.py) stands in for the encoder except in the last test (LiteMedSAM).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("distributed")

import napari_mias_sam.backbones as backbones_mod  # noqa: E402
from fakes import FakeBackbone  # noqa: E402
from nifti_crops import crop_slices  # noqa: E402
from dataset_fixtures import brats2021_root  # noqa: E402
from napari_mias_sam.bank import load_bank  # noqa: E402
from napari_mias_sam.bank.knn import index_vectors  # noqa: E402
from napari_mias_sam.cli.commands import main  # noqa: E402
from napari_mias_sam.core.errors import InputError  # noqa: E402
from napari_mias_sam.scale import connect, parse_scheduler  # noqa: E402
import napari_mias_sam.scale.cluster as cluster_mod  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample_data"
SHA = "fake-weights-0001"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Small cuts of the bundled sample (the searches stay short): three normal volumes of 4
    slices, two cases of 6 slices (lesion on 5 of them) with their ground truths."""
    d = tmp_path_factory.mktemp("sample-cut")
    return {"normals": [crop_slices(SAMPLE / f"normal_0{i}.nii.gz", d / f"normal_0{i}.nii.gz", 5, 9) for i in (1, 2, 3)],
            "cases": [crop_slices(SAMPLE / f"{c}.nii.gz", d / f"{c}.nii.gz", 3, 9) for c in ("case_01", "case_02")],
            "gts": [crop_slices(SAMPLE / f"{c}_seg.nii.gz", d / f"{c}_seg.nii.gz", 3, 9) for c in ("case_01", "case_02")]}


def fake_spec(name="litemedsam", checkpoint=None, device="auto", *, precision="fp32", encoding="standard", delay=0.0):
    return functools.partial(FakeBackbone, name=name, sha=SHA, delay=delay)


def fake_loader(name="litemedsam", checkpoint=None, device=None, **kwargs):
    return FakeBackbone(name=name, sha=SHA)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Two worker processes that import this checkout (and tests/fakes.py), with a private cache."""
    cache = tmp_path_factory.mktemp("dask-cache")
    with pytest.MonkeyPatch.context() as mp:
        path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tools"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
        mp.setenv("PYTHONPATH", path)
        mp.setenv("MIAS_SAM_CACHE", str(cache))
        s = connect("local:2", dashboard_address=":0")
    assert len(s.workers) == 2
    yield s
    s.close()


@pytest.fixture
def on_dask(session, monkeypatch, tmp_path):
    """The CLI's serial runs and its --dask workers use the fake backbone; returns --dask's value."""
    monkeypatch.setenv("MIAS_SAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_loader)
    monkeypatch.setattr(cluster_mod, "backbone_spec", fake_spec)
    return session.client.scheduler.address


@pytest.fixture(scope="module")
def banks(data, tmp_path_factory) -> dict[str, Path]:
    """The serial banks of the normal cuts (mean256), built once: ``one`` (one index) and ``two``
    (two shards, staged here without Dask)."""
    d = tmp_path_factory.mktemp("serial-banks")
    common = [*map(str, data["normals"]), "--layout", "mean256"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIAS_SAM_CACHE", str(d / "cache"))
        mp.setattr(backbones_mod, "load_backbone", fake_loader)
        assert main(["build-bank", *common, "--out", str(d / "one")]) == 0
        assert main(["build-bank", *common, "--out", str(d / "two"), "--shards", "2"]) == 0
    return {"one": d / "one", "two": d / "two"}


def vectors(bank) -> np.ndarray:
    return index_vectors(bank.index, 0, bank.ntotal)


def assert_same_bank(a, b) -> None:
    np.testing.assert_array_equal(vectors(a), vectors(b))
    assert a.manifest["calibration"] == b.manifest["calibration"]
    assert a.manifest["sources"] == b.manifest["sources"] and a.manifest["counts"] == b.manifest["counts"]
    q = np.random.default_rng(3).standard_normal((2048, a.dim)).astype(np.float32)
    np.testing.assert_array_equal(a.search(q, 3), b.search(q, 3))


def test_parse_scheduler():
    assert parse_scheduler("local").local and parse_scheduler("local").workers is None
    assert parse_scheduler("local:3").workers == 3
    assert parse_scheduler("tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert parse_scheduler("node12:8786").address == "tcp://node12:8786"
    for bad, msg in (("local:0", "at least one worker"), ("cluster", "not a scheduler"), ("nope.json", "no such scheduler file")):
        with pytest.raises(InputError, match=msg):
            parse_scheduler(bad)


def test_a_wrong_address_is_one_line_before_anything_is_written(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_loader)
    out = tmp_path / "bank"
    t0 = time.perf_counter()
    assert main(["build-bank", *map(str, data["normals"]), "--out", str(out), "--dask", "tcp://127.0.0.1:9"]) == 2
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mias-sam build-bank: error: --dask tcp://127.0.0.1:9: no Dask scheduler answered")
    assert sorted(os.listdir(tmp_path)) == []  # no bank, no lock, no staging
    assert main(["segment", str(data["cases"][0]), "--bank", str(out), "--out", str(tmp_path / "o"), "--dask", "local:0"]) == 2


def test_without_dask_nothing_imports_distributed(data, tmp_path):
    script = f"""
import sys
sys.path[:0] = {[str(ROOT / 'src'), str(ROOT / 'tests')]!r}
import napari_mias_sam.backbones as b
from fakes import FakeBackbone
b.load_backbone = lambda *a, **k: FakeBackbone(name="litemedsam")
from napari_mias_sam.cli import main
assert main(["build-bank", {str(data["normals"][0])!r}, "--out", {str(tmp_path / 'b')!r}, "--layout", "mean256"]) == 0
assert main(["segment", {str(data["cases"][0])!r}, "--bank", {str(tmp_path / 'b')!r}, "--out", {str(tmp_path / 'o')!r}]) == 0
assert "distributed" not in sys.modules, "dask.distributed was imported without --dask"
print("ok")
"""
    env = {**os.environ, "MIAS_SAM_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_bank_on_two_workers_is_the_serial_bank(data, banks, on_dask, tmp_path, capsys):
    common = [*map(str, data["normals"]), "--layout", "mean256"]
    assert main(["build-bank", *common, "--out", str(tmp_path / "dask"), "--dask", on_dask]) == 0
    err = capsys.readouterr().err
    assert "Dask: the scheduler" in err and "(2 workers)" in err and "encode normal sources on 2 Dask workers: 3/3" in err
    assert "each of 2 Dask worker(s)" in err  # the memory plan per worker
    serial, dask = load_bank(banks["one"]), load_bank(tmp_path / "dask")
    assert_same_bank(serial, dask)
    assert not any(p.name.endswith(".mias-sam-staging") for p in tmp_path.iterdir())  # staging removed


def test_brats_root_on_two_workers_in_two_shards(on_dask, tmp_path, capsys):
    root = brats2021_root(tmp_path / "BraTS2021_Training")
    common = [str(root), "--modality", "flair", "--layout", "mean256"]
    assert main(["build-bank", *common, "--out", str(tmp_path / "serial")]) == 0
    assert main(["build-bank", *common, "--out", str(tmp_path / "b2"), "--dask", on_dask, "--shards", "2"]) == 0
    serial, sharded = load_bank(tmp_path / "serial"), load_bank(tmp_path / "b2")
    assert sharded.shards == 2 and sharded.manifest["format_version"] == 2
    assert_same_bank(serial, sharded)
    assert sharded.manifest["dataset"] == serial.manifest["dataset"]
    d1, i1 = serial.index.search(np.ascontiguousarray(vectors(serial)[::97] + 0.01), 4)
    d2, i2 = sharded.index.search(np.ascontiguousarray(vectors(serial)[::97] + 0.01), 4)
    np.testing.assert_array_equal(i1, i2)  # the same neighbours


def test_two_shards_give_one_shard_neighbours_and_masks(data, banks, on_dask, tmp_path):
    one, two = load_bank(banks["one"]), load_bank(banks["two"])  # two: staged here, no Dask
    assert two.shards == 2
    q = vectors(one)[::101] + 0.003
    d1, i1 = one.index.search(q, 5)
    d2, i2 = two.index.search(q, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    for b in ("one", "two"):
        assert main(["segment", *map(str, data["cases"]), "--bank", str(banks[b]), "--out", str(tmp_path / f"out-{b}")]) == 0
    for c in data["cases"]:
        stem = c.name[: -len(".nii.gz")]
        for kind in ("mask", "anomaly"):
            m1 = np.asanyarray(nib.load(str(tmp_path / "out-one" / f"{stem}_{kind}.nii.gz")).dataobj)
            m2 = np.asanyarray(nib.load(str(tmp_path / "out-two" / f"{stem}_{kind}.nii.gz")).dataobj)
            assert m1.tobytes() == m2.tobytes() and (kind == "mask" or m1.std() > 0), (stem, kind)


def test_segment_several_volumes_on_dask_gives_the_serial_outputs(data, banks, on_dask, tmp_path, capsys):
    capsys.readouterr()
    args = ["segment", *map(str, data["cases"]), "--gt", *map(str, data["gts"]), "--bank", str(banks["two"]), "--json"]
    assert main([*args, "--out", str(tmp_path / "serial")]) == 0
    serial = json.loads(capsys.readouterr().out)
    assert main([*args, "--out", str(tmp_path / "dask"), "--dask", on_dask]) == 0
    dask = json.loads(capsys.readouterr().out)
    for s, d in zip(serial["results"], dask["results"]):  # in input order
        assert s["volume"] == d["volume"] and s["metrics"] == d["metrics"] and s["settings"] == d["settings"]
    for c in data["cases"]:
        stem = c.name[: -len(".nii.gz")]
        for kind in ("mask", "anomaly"):
            a = nib.load(str(tmp_path / "serial" / f"{stem}_{kind}.nii.gz"))
            b = nib.load(str(tmp_path / "dask" / f"{stem}_{kind}.nii.gz"))
            assert np.asanyarray(a.dataobj).tobytes() == np.asanyarray(b.dataobj).tobytes(), (stem, kind)  # byte-identical
            assert (a.header.binaryblock == b.header.binaryblock) and np.array_equal(a.affine, b.affine)
        assert (tmp_path / "serial" / f"{stem}_points.csv").read_bytes() == (tmp_path / "dask" / f"{stem}_points.csv").read_bytes()
    assert not [p.name for p in (tmp_path / "dask").iterdir() if p.name.startswith(".")]  # no temporary or lock files left


def test_evaluate_on_dask_gives_the_serial_results(data, banks, on_dask, tmp_path, capsys):
    args = ["evaluate", "--bank", str(banks["one"]), "--images", *map(str, data["cases"]), "--gts", *map(str, data["gts"]),
            "--gammas", "3,5", "--ks", "1,2", "--prompts", "cog-box,regions"]
    assert main([*args, "--out", str(tmp_path / "serial")]) == 0
    assert main([*args, "--out", str(tmp_path / "dask"), "--dask", on_dask]) == 0
    capsys.readouterr()
    s = json.loads((tmp_path / "serial" / "results.json").read_text())
    d = json.loads((tmp_path / "dask" / "results.json").read_text())
    assert d.pop("dask") == on_dask
    for r in (s, d):
        r.pop("timings_s"), r.pop("outputs", None)
    assert s == d
    assert (tmp_path / "serial" / "results.csv").read_bytes() == (tmp_path / "dask" / "results.csv").read_bytes()
    assert not (tmp_path / "dask" / ".mias-sam-evaluate-staging").exists()


def test_a_plan_that_does_not_fit_is_refused_with_what_to_change(data, on_dask, tmp_path, monkeypatch, capsys):
    import napari_mias_sam.core.machine as machine

    monkeypatch.setattr(machine, "ram_bytes", lambda: (4_000_000_000, 2_500_000_000))
    assert main(["build-bank", *map(str, data["normals"]), "--out", str(tmp_path / "b"), "--dask", on_dask]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "mias-sam build-bank: error: build-bank: needs about" in err and "which has 2.50 GB available" in err
    assert "--index flat-sq8" in err and "--coreset 0.1" in err and "--shards" in err
    assert not (tmp_path / "b").exists()
    from napari_mias_sam.jobs.memory_plan import plan_build_memory

    plan = plan_build_memory(n_slices=1_251 * 100, source_paths=[None], source_slices=[155], backbone="litemedsam", batch_size=4,
                             layout="paper1024", index_type="flat", coreset_ratio=None, shards=1, workers=4, local_workers=4,
                             available=64_000_000_000)
    with pytest.raises(InputError, match=r"--shards \d+ \(one shard of about"):
        plan.check(64_000_000_000)
    plan.workers, plan.local_workers = 1, 0
    with pytest.raises(InputError, match="per Dask worker, more than worker w1's limit"):
        plan.check(None, {"w1": 1_000_000_000})


def test_a_worker_killed_during_a_build_still_yields_the_identical_bank(data, session, on_dask, tmp_path):
    from napari_mias_sam.bank.staging import StagingArea, staging_dir
    from napari_mias_sam.jobs.bank_builds import bank_inputs_from_files, build_bank_job
    from napari_mias_sam.method.preprocess import PREPROCESS_PRESETS
    from napari_mias_sam.scale import build_bank_on_dask, register_backbone
    from napari_mias_sam.scale.tasks import worker_pid

    files = data["normals"] + data["cases"]  # five sources
    src = bank_inputs_from_files(files, PREPROCESS_PRESETS["mri"])
    serial = build_bank_job(src, FakeBackbone(name="litemedsam", sha=SHA), layout="mean256")
    info = register_backbone(session, fake_spec(delay=0.5))  # 2-3 s per source
    pids = session.client.run(worker_pid)
    stage = staging_dir(tmp_path / "bank")
    killed = {}

    def kill_a_busy_worker() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            busy = [a for a, keys in session.client.processing().items() if any("stage-source" in str(k) for k in keys)]
            if StagingArea(stage).staged() and busy:
                killed["pid"] = pids[busy[0]]
                os.kill(killed["pid"], signal.SIGKILL)  # mid-source: its task must run again elsewhere
            time.sleep(0.05)

    t = threading.Thread(target=kill_a_busy_worker)
    t.start()
    try:
        bank = build_bank_on_dask(bank_inputs_from_files(files, PREPROCESS_PRESETS["mri"]), session, info, staging=stage,
                                  layout="mean256", shards=2)
    finally:
        t.join()
        register_backbone(session, fake_spec())
    assert killed, "no worker was killed: the build finished first"
    session.client.wait_for_workers(2, timeout=120)
    assert killed["pid"] not in session.client.run(worker_pid).values()  # that process is gone, replaced
    assert_same_bank(serial, bank)


@pytest.mark.slow
def test_litemedsam_bank_and_segment_on_two_workers(session, sample_subset, sample_bank, lite_backbone, tmp_path):
    """The real encoder on the workers (one per process, loaded by the plugin): the same bank as
    one process's, and the same masks."""
    from napari_mias_sam.bank.staging import staging_dir
    from napari_mias_sam.jobs.bank_builds import bank_inputs_from_files
    from napari_mias_sam.method.preprocess import PREPROCESS_PRESETS
    from napari_mias_sam.pipeline.segment import segment_volume
    from napari_mias_sam.pipeline.settings import SegmentSettings
    from napari_mias_sam.scale import build_bank_on_dask, register_backbone
    from napari_mias_sam.scale.tasks import segment_volume_task
    from napari_mias_sam.jobs.dataset_runs import SegmentInput
    from napari_mias_sam.jobs.outputs import segment_job

    info = register_backbone(session, cluster_mod.backbone_spec("litemedsam", device="cpu"))
    assert info["describe"] == lite_backbone.describe()
    bank = build_bank_on_dask(bank_inputs_from_files(sample_subset["normals"], PREPROCESS_PRESETS["mri"]), session, info,
                              staging=staging_dir(tmp_path / "bank"))
    assert_same_bank(sample_bank, bank)
    bank.save(tmp_path / "bank")
    settings = SegmentSettings()

    def files(tag: str) -> dict[str, str]:
        return {k: str(tmp_path / f"{tag}_{k}{'.csv' if k in ('points', 'lesions_table') else '.nii.gz'}")
                for k in ("mask", "anomaly", "points", "lesions", "lesions_table")}

    job = SegmentInput(image=Path(sample_subset["case"]), gt=Path(sample_subset["gt"]))
    rep = session.client.submit(segment_volume_task, job, str(tmp_path / "bank"), settings, (), None, files("w"), None, 4,
                                pure=False).result()
    vol, gt = job.load()
    here = segment_volume(vol, sample_bank, lite_backbone, settings)
    rep_here = segment_job(job, lambda: (here, gt), (), files={k: Path(v) for k, v in files("h").items()})
    for r in (rep, rep_here):
        r.pop("timings_s")
    assert rep == rep_here  # settings, metrics, lesions: the same report
    for k in ("mask", "anomaly", "lesions"):
        w, h = nib.load(files("w")[k]), nib.load(files("h")[k])
        assert np.asanyarray(w.dataobj).tobytes() == np.asanyarray(h.dataobj).tobytes(), k
    assert here.mask_volume().any()
    for k in ("points", "lesions_table"):
        assert Path(files("w")[k]).read_bytes() == Path(files("h")[k]).read_bytes(), k
    register_backbone(session, fake_spec())
