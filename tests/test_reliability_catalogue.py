"""The reliability catalogue (issue 14): what a careless or unlucky user can feed the CLI.

One table, :data:`CASES`: bad volumes and ground truths, damaged or foreign banks, output
locations that are files / under files / immutable, existing outputs, bad options and resource
limits, missing or garbage weights. Each case runs ``mias-sam`` in-process with the fake backbone
(tests/fakes.py) on tiny volumes and asserts the exit code, the one-line message, that
every input is byte-identical afterwards and that nothing stray was left (no output, no
temporary, no lock). Beside the table: a batch where one volume fails during the work, two runs
racing for the same outputs (subprocesses), SIGTERM / SIGINT / SIGKILL at several points of a
bank save and of a segment write (subprocesses), and the user's umask on created files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch

import napari_mias_sam.backbones as backbones_mod
from core_fixtures import anatomy_volume, disk, snapshot, write_nifti
from fakes import FakeBackbone
from napari_mias_sam.cli.commands import main

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
SHAPE = (48, 48, 3)
REAL_LOAD = backbones_mod.load_backbone
RUNNER = Path(__file__).resolve().parent / "reliability_runner.py"


def fake_load(name="litemedsam", checkpoint=None, device=None, **kwargs):
    """The fake backbone, except where a weights file is named (then the real loader reads it)."""
    if name.startswith("sam-") or checkpoint is not None:
        return REAL_LOAD(name, checkpoint, device, **kwargs)
    return FakeBackbone()


def other_weights_load(name="litemedsam", checkpoint=None, device=None, **kwargs):
    bb = FakeBackbone()
    bb.weights_sha256 = "ffffffffffff-other-weights"
    return bb


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two normal volumes, a bank built from them by 'mias-sam build-bank' and a test case."""
    root = tmp_path_factory.mktemp("reliability")
    normals = root / "normals"
    for i in (1, 2):
        write_nifti(normals / f"n{i}.nii.gz", anatomy_volume(SHAPE, seed=i) * 200, AFFINE)
    gt = np.zeros(SHAPE, np.uint8)
    gt[..., 1] = disk(SHAPE[:2], (30, 20), 5)
    data = anatomy_volume(SHAPE, seed=5) * 200
    data[..., 1] = np.where(gt[..., 1] > 0, 400.0, data[..., 1])
    cases = root / "cases"
    write_nifti(cases / "case.nii.gz", data, AFFINE)
    write_nifti(cases / "case_seg.nii.gz", gt, AFFINE)
    write_nifti(cases / "case2.nii.gz", anatomy_volume(SHAPE, seed=6) * 200, AFFINE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIAS_SAM_CACHE", str(root / "user-cache"))
        mp.setattr(backbones_mod, "load_backbone", fake_load)
        rc = main(["build-bank", str(normals), "--out", str(root / "bank"), "--layout", "mean256", "--json"])
    assert rc == 0
    return {"root": root, "normals": normals, "cases": cases, "bank": root / "bank", "gt": gt, "data": data}


@pytest.fixture(autouse=True)
def _private_cache(world, monkeypatch):
    monkeypatch.setenv("MIAS_SAM_CACHE", str(world["root"] / "user-cache"))


def entries(root: Path) -> set[str]:
    """Every path under ``root`` (files and folders, hidden ones too), relative."""
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def watched(world) -> dict:
    return {k: snapshot(world[k]) for k in ("normals", "cases", "bank")}


# --------------------------------------------------------------------------- case helpers
class Ctx:
    """What a case sees: the shared world and its own folder (``tmp``), inputs in ``tmp/in``."""

    def __init__(self, world: dict, tmp: Path) -> None:
        self.w = world
        self.tmp = tmp
        self.inp = tmp / "in"
        self.inp.mkdir()
        self.out = tmp / "out"
        self.cleanups: list[Callable[[], None]] = []

    @property
    def case(self) -> str:
        return str(self.w["cases"] / "case.nii.gz")

    @property
    def seg(self) -> str:
        return str(self.w["cases"] / "case_seg.nii.gz")

    @property
    def bank(self) -> str:
        return str(self.w["bank"])

    def seg_args(self, *vols: str, out: Path | None = None, bank: str | None = None) -> list[str]:
        return ["segment", *(vols or (self.case,)), "--bank", bank or self.bank, "--out", str(out or self.out)]

    def eval_args(self, out: Path | None = None) -> list[str]:
        return ["evaluate", "--bank", self.bank, "--images", self.case, "--gts", self.seg, "--out", str(out or self.out),
                "--gammas", "5", "--ks", "1", "--prompts", "cog-point"]

    def bank_copy(self, edit: Callable[[dict], None] | None = None) -> str:
        dst = self.inp / "bank"
        shutil.copytree(self.w["bank"], dst)
        if edit is not None:
            mf = dst / "manifest.json"
            m = json.loads(mf.read_text())
            edit(m)
            mf.write_text(json.dumps(m))
        return str(dst)

    def unwritable(self, folder: Path) -> Path:
        """A folder nothing can be written into: immutable (chattr +i) as root, else read-only."""
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
                pytest.skip("running as root without chattr +i: no way to make a folder unwritable")
            self.cleanups.append(lambda: subprocess.run(["chattr", "-i", str(folder)], check=False))
        else:
            folder.chmod(0o555)
            self.cleanups.append(lambda: folder.chmod(0o755))
        return folder

    def file(self, name: str = "afile.txt") -> Path:
        p = self.tmp / name
        p.write_text("not a folder")
        return p


def bad_volume(ctx: Ctx, kind: str) -> str:
    p = ctx.inp / "bad.nii.gz"
    rng = np.random.default_rng(0)
    if kind == "truncated":
        good = write_nifti(ctx.tmp / "full.nii.gz", rng.normal(size=SHAPE).astype(np.float32))
        p.write_bytes(good.read_bytes()[:300])
        good.unlink()
    elif kind == "corrupt":
        p.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "2d":
        write_nifti(p, np.ones(SHAPE[:2], np.float32))
    elif kind == "4d":
        write_nifti(p, np.ones(SHAPE + (2,), np.float32))
    elif kind == "nan":
        d = anatomy_volume(SHAPE, seed=1)
        d[3, 3, 1] = np.nan
        write_nifti(p, d, AFFINE)
    elif kind == "constant":
        write_nifti(p, np.full(SHAPE, 3.0, np.float32), AFFINE)
    elif kind == "thin-181x2x6":
        write_nifti(p, rng.random((181, 2, 6)).astype(np.float32), AFFINE)
    elif kind == "thin-1x217x6":
        write_nifti(p, rng.random((1, 217, 6)).astype(np.float32), AFFINE)
    elif kind == "complex":
        d = anatomy_volume(SHAPE, seed=1)
        write_nifti(p, (d + 1j * d[::-1]).astype(np.complex64), AFFINE)
    elif kind == "rgb24":
        rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        rgb["R"] = (anatomy_volume(SHAPE, seed=1) * 255).astype(np.uint8)
        write_nifti(p, rgb, AFFINE)
    elif kind in ("affine-zeros", "affine-nan"):
        h = nib.Nifti1Header()
        h.set_data_shape(SHAPE)
        h.set_data_dtype(np.float32)
        h["qform_code"], h["sform_code"] = 0, 2
        rows = [np.zeros(4)] * 3 if kind == "affine-zeros" else [[np.nan, 0, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0]]
        h["srow_x"], h["srow_y"], h["srow_z"] = rows
        nib.save(nib.Nifti1Image(anatomy_volume(SHAPE, seed=1), None, header=h), str(p))
    else:
        raise AssertionError(kind)
    return str(p)


def bad_gt(ctx: Ctx, kind: str) -> str:
    p = ctx.inp / "gt.nii.gz"
    gt = ctx.w["gt"].astype(np.int16)
    if kind == "negative":
        gt[0:4, 0:4, :] = -1
        write_nifti(p, gt, AFFINE)
    elif kind == "shape":
        write_nifti(p, gt[:, :40], AFFINE)
    elif kind == "affine":
        write_nifti(p, gt, np.diag([1.0, 1.0, 2.5, 1.0]))
    return str(p)


def set_cal(m: dict, value) -> None:
    m["calibration"]["per_k"]["1"]["low"] = value


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    rc: int = 2
    says: tuple[str, ...] = ()
    loader: Callable = fake_load
    creates: Callable[[Ctx], set[str]] | None = None  # for rc 0: what the run adds under the case folder
    warns: str | None = None
    skip: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)


def V(kind: str, *says: str) -> Case:
    return Case(f"segment-volume-{kind}", lambda c, k=kind: c.seg_args(bad_volume(c, k)), says=("bad.nii.gz", *says))


def G(kind: str, *says: str) -> Case:
    return Case(f"segment-gt-{kind}", lambda c, k=kind: c.seg_args() + ["--gt", bad_gt(c, k)], says=("gt.nii.gz", *says))


def M(name: str, edit: Callable[[dict], None], *says: str, command: str = "segment") -> Case:
    if command == "info":
        return Case(f"info-manifest-{name}", lambda c: ["info", c.bank_copy(edit)], says=("manifest.json", *says))
    return Case(f"segment-manifest-{name}", lambda c: c.seg_args(bank=c.bank_copy(edit)), says=("manifest.json", *says))


def _results_exist(c: Ctx) -> list[str]:
    c.out.mkdir()
    (c.out / "results.csv").write_text("my earlier results\n")
    return c.eval_args()


def _outputs_exist(c: Ctx) -> list[str]:
    c.out.mkdir()
    (c.out / "case_mask.nii.gz").write_text("my earlier mask")
    return c.seg_args()


def _overwrite_results(c: Ctx) -> list[str]:
    c.out.mkdir()
    (c.out / "results.csv").write_text("my earlier results\n")
    return c.eval_args() + ["--overwrite"]


def _garbage_checkpoint(c: Ctx) -> list[str]:
    g = c.inp / "lite_medsam.pth"
    g.write_bytes(np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return c.seg_args(bank=c.bank_copy(lambda m: m["backbone"].update(name="litemedsam"))) + ["--checkpoint", str(g)]


def _in_batch_bad(c: Ctx) -> list[str]:
    return c.seg_args(c.case, bad_volume(c, "nan"))


def _output_is_input(c: Ctx) -> list[str]:
    case = write_nifti(c.inp / "case.nii.gz", anatomy_volume(SHAPE, seed=1), AFFINE)
    gt = write_nifti(c.inp / "case_mask.nii.gz", c.w["gt"], AFFINE)  # the mask output's name
    return c.seg_args(str(case), out=c.inp) + ["--gt", str(gt), "--overwrite"]


def _not_a_bank_overwrite(c: Ctx) -> list[str]:
    other = c.inp / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    return ["build-bank", str(c.w["normals"]), "--out", str(other), "--overwrite"]


EVAL_OUT = {"results.csv", "results.md", "results.json", "gamma_sweep.png", "ablations.png"}
NO_CUDA = None if not torch.cuda.is_available() else "this machine has a CUDA GPU"

CASES: list[Case] = [
    # ---- volumes: unreadable, wrong shape or type, values the method cannot use
    V("truncated", "cannot read this NIfTI file"),
    V("corrupt", "cannot read this NIfTI file"),
    V("2d", "has 2 dimensions"),
    V("4d", "has 4 dimensions"),
    V("nan", "NaN or infinite"),
    V("constant", "every voxel has the same value"),
    V("thin-181x2x6", "181 x 2 voxels", "at least 8 x 8"),
    V("thin-1x217x6", "1 x 217 voxels", "at least 8 x 8"),
    V("complex", "complex voxels"),
    V("rgb24", "RGB colour voxels"),
    V("affine-zeros", "not invertible"),
    V("affine-nan", "NaN or infinite values"),
    Case("segment-volume-missing", lambda c: c.seg_args(str(c.inp / "nope.nii.gz")), says=("nope.nii.gz", "no such file")),
    Case("segment-batch-one-bad-volume", _in_batch_bad, says=("bad.nii.gz", "NaN or infinite")),
    Case("segment-duplicate-stems", lambda c: c.seg_args(c.case, c.case), says=("share a file name",)),
    Case("segment-output-is-an-input", _output_is_input, says=("case_mask.nii.gz", "would overwrite an input")),
    # ---- ground truths
    G("negative", "negative labels", "minimum -1"),
    G("shape", "shape (48, 40, 3) differs"),
    G("affine", "affine differs"),
    Case("segment-gt-count", lambda c: c.seg_args() + ["--gt", c.seg, c.seg], says=("one ground truth per volume",)),
    # ---- banks: missing, foreign, damaged or edited manifests
    Case("segment-bank-missing", lambda c: c.seg_args(bank=str(c.inp / "nobank")), says=("nobank", "not a memory bank folder")),
    Case("segment-bank-foreign-weights", lambda c: c.seg_args(), says=("ffffffffffff", "rebuild the bank"), loader=other_weights_load),
    M("unknown-preprocessing", lambda m: m["preprocessing"].update(mode="zscore"), "'preprocessing.mode'", "'zscore'"),
    M("unknown-scope", lambda m: m["preprocessing"].update(scope="cohort"), "'preprocessing.scope'"),
    M("nan-calibration", lambda m: set_cal(m, float("nan")), "'calibration.per_k.1.low'", "finite number"),
    M("inf-calibration", lambda m: set_cal(m, float("inf")), "'calibration.per_k.1.low'", "finite number"),
    M("index-file-outside", lambda m: m["index"].update(file="../../normals/n1.nii.gz"), "'index.file'", "outside the bank folder"),
    M("index-file-absolute", lambda m: m["index"].update(file="/etc/hostname"), "'index.file'", "outside the bank folder"),
    M("ntotal-string", lambda m: m["index"].update(ntotal="abc"), "'index.ntotal'", "integer"),
    M("feature-dim-string", lambda m: m.update(feature_dim="256"), "'feature_dim'", "integer"),
    M("backbone-string", lambda m: m.update(backbone="litemedsam"), "'backbone'", "object"),
    M("unknown-index-type", lambda m: m["index"].update(type="hnsw"), "'index.type'"),
    M("unknown-axis", lambda m: m.update(slice_axis="oblique"), "'slice_axis'"),
    M("layout-mismatch", lambda m: m.update(patch_layout="paper1024"), "'feature_dim'", "1024-d"),
    M("missing-field", lambda m: m.pop("patch_layout"), "'patch_layout' is missing"),
    M("calibration-wrong-type", lambda m: m["calibration"]["per_k"].update({"1": "high"}), "'calibration.per_k.1'", command="info"),
    M("counts-wrong-type", lambda m: m["counts"].update(slices=[6]), "'counts.slices'", command="info"),
    Case("segment-manifest-not-json", lambda c: c.seg_args(bank=(lambda b: (Path(b, "manifest.json").write_text("{oops"), b)[1])(c.bank_copy())),
         says=("manifest.json", "not valid JSON")),
    Case("segment-bank-index-missing", lambda c: c.seg_args(bank=(lambda b: (Path(b, "index.faiss").unlink(), b)[1])(c.bank_copy())),
         says=("index.faiss", "missing")),
    # ---- output locations (checked before any work)
    Case("segment-out-is-a-file", lambda c: c.seg_args(out=c.file()), says=("afile.txt", "is an existing file, not a folder")),
    Case("segment-out-under-a-file", lambda c: c.seg_args(out=c.file() / "sub"), says=("afile.txt", "lies under")),
    Case("segment-out-immutable", lambda c: c.seg_args(out=c.unwritable(c.tmp / "ro")), says=("ro", "cannot write there")),
    Case("segment-out-under-immutable", lambda c: c.seg_args(out=c.unwritable(c.tmp / "ro") / "new"), says=("ro", "cannot write there")),
    Case("segment-outputs-exist", _outputs_exist, says=("case_mask.nii.gz", "already exists", "--overwrite")),
    Case("build-bank-out-is-a-file", lambda c: ["build-bank", str(c.w["normals"]), "--out", str(c.file())], says=("afile.txt", "not a folder")),
    Case("build-bank-out-under-a-file", lambda c: ["build-bank", str(c.w["normals"]), "--out", str(c.file() / "bank")], says=("lies under",)),
    Case("build-bank-out-immutable", lambda c: ["build-bank", str(c.w["normals"]), "--out", str(c.unwritable(c.tmp / "ro") / "bank")],
         says=("cannot write there",)),
    Case("build-bank-exists", lambda c: ["build-bank", str(c.w["normals"]), "--out", c.bank], says=("already exists",)),
    Case("build-bank-out-is-input", lambda c: ["build-bank", str(c.w["normals"]), "--out", str(c.w["normals"]), "--overwrite"],
         says=("cannot be an input folder",)),
    Case("build-bank-not-a-bank-overwrite", _not_a_bank_overwrite, says=("not a memory bank folder",)),
    Case("evaluate-out-is-a-file", lambda c: c.eval_args(out=c.file()), says=("afile.txt", "not a folder")),
    Case("evaluate-out-under-a-file", lambda c: c.eval_args(out=c.file() / "eval"), says=("lies under",)),
    Case("evaluate-out-immutable", lambda c: c.eval_args(out=c.unwritable(c.tmp / "ro")), says=("cannot write there",)),
    Case("evaluate-results-exist", _results_exist, says=("results.csv", "already exists", "--overwrite")),
    Case("evaluate-results-overwrite", _overwrite_results, rc=0, creates=lambda c: {f"out/{n}" for n in EVAL_OUT}),
    Case("evaluate-images-without-gts", lambda c: ["evaluate", "--bank", c.bank, "--images", c.case, "--out", str(c.out)], says=("--gts",)),
    # ---- options and resource guards
    Case("segment-device-bogus", lambda c: c.seg_args() + ["--device", "bogus"], says=("--device 'bogus'", "not a device")),
    Case("segment-device-cuda-absent", lambda c: c.seg_args() + ["--device", "cuda"], says=("no CUDA GPU",), skip=NO_CUDA),
    Case("segment-fp16-on-cpu", lambda c: c.seg_args() + ["--device", "cpu", "--precision", "fp16"], says=("fp16", "CPU")),
    Case("segment-bf16-on-cpu-warns", lambda c: c.seg_args() + ["--device", "cpu", "--precision", "bf16"], rc=0, warns="bf16",
         creates=lambda c: {"out", "out/case_mask.nii.gz", "out/case_anomaly.nii.gz", "out/case_points.csv"}),
    Case("segment-gamma-1e6", lambda c: c.seg_args() + ["--gamma", "1e6"], says=("below 1000", "1000000")),
    Case("segment-gamma-0", lambda c: c.seg_args() + ["--gamma", "0"], says=("above 0",)),
    Case("segment-gamma-nan", lambda c: c.seg_args() + ["--gamma", "nan"], says=("gamma",)),
    Case("segment-k-100000", lambda c: c.seg_args() + ["--k", "100000"], says=("--k 100000", "holds only 6,144 patches")),
    Case("segment-k-0", lambda c: c.seg_args() + ["--k", "0"], says=("k must be >= 1",)),
    Case("segment-batch-size-0", lambda c: c.seg_args() + ["--batch-size", "0"], says=("--batch-size",)),
    Case("segment-axis-bogus", lambda c: c.seg_args() + ["--axis", "diagonal"], says=("slice axis",)),
    Case("evaluate-ks-100000", lambda c: c.eval_args()[:-4] + ["--ks", "1,100000"], says=("--ks 100000", "holds only")),
    Case("evaluate-gammas-1e6", lambda c: c.eval_args()[:-6] + ["--gammas", "5,1e6"], says=("below 1000",)),
    Case("build-bank-coreset-2", lambda c: ["build-bank", str(c.w["normals"]), "--out", str(c.out), "--coreset", "2"], says=("--coreset",)),
    Case("build-bank-fp16-on-cpu", lambda c: ["build-bank", str(c.w["normals"]), "--out", str(c.out), "--device", "cpu",
                                              "--precision", "fp16"], says=("fp16",)),
    Case("build-bank-device-bogus", lambda c: ["build-bank", str(c.w["normals"]), "--out", str(c.out), "--device", "gpu0"],
         says=("not a device",)),
    Case("build-bank-input-missing", lambda c: ["build-bank", str(c.inp / "none.nii.gz"), "--out", str(c.out)], says=("no such file",)),
    Case("build-bank-constant-input", lambda c: ["build-bank", bad_volume(c, "constant"), "--out", str(c.out)], says=("same value",)),
    Case("build-bank-thin-input", lambda c: ["build-bank", bad_volume(c, "thin-181x2x6"), "--out", str(c.out)], says=("181 x 2",)),
    # ---- weights
    Case("segment-garbage-checkpoint", _garbage_checkpoint, says=("lite_medsam.pth", "not a PyTorch checkpoint")),
    Case("segment-missing-sam-weights", lambda c: c.seg_args(bank=c.bank_copy(lambda m: m["backbone"].update(name="sam-vit_b")))
         + ["--checkpoint", str(c.inp / "sam_vit_b.pth")], says=("sam_vit_b.pth", "weights file not found")),
    Case("segment-backbone-not-the-banks", lambda c: c.seg_args() + ["--backbone", "sam-vit_b", "--checkpoint", str(c.inp / "sam_vit_b.pth")],
         says=("built with fake", "selected backbone is sam-vit_b")),
]


def one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert lines[-1].startswith(f"mias-sam {command}: error: "), err
    return lines[-1]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue(case: Case, world, tmp_path, monkeypatch, capsys):
    if case.skip:
        pytest.skip(case.skip)
    monkeypatch.setattr(backbones_mod, "load_backbone", case.loader)
    ctx = Ctx(world, tmp_path)
    try:
        argv = case.argv(ctx)
        before_world, before_files, before_entries = watched(world), snapshot(tmp_path), entries(tmp_path)
        capsys.readouterr()
        rc = main(argv)
        cap = capsys.readouterr()
    finally:
        for undo in ctx.cleanups:
            undo()
    assert rc == case.rc, cap.err
    if case.rc:
        assert cap.out == ""
        line = one_line_error(cap.err, argv[0])
        for text in case.says:
            assert text in line, line
    if case.warns:
        assert case.warns in cap.err
    assert watched(world) == before_world  # the inputs and the shared bank are byte-identical
    after = entries(tmp_path)
    added = case.creates(ctx) if case.creates else set()
    assert after == before_entries | added, sorted(after ^ before_entries)  # nothing stray: no output, temporary or lock
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before_files and k not in added} == {
        k: v for k, v in before_files.items() if k not in added}


def test_catalogue_size():
    """The count the report gives (one test per case above, plus the scenario tests below)."""
    assert len(CASES) == len({c.id for c in CASES}) >= 70


# --------------------------------------------------------------------------- batch
def test_batch_reports_each_volume_and_keeps_only_complete_sets(world, tmp_path, monkeypatch, capsys):
    """A volume that fails during the work (here a numerical failure deep in a library) is named,
    the others finish with complete outputs, the exit status is 2, nothing half-written remains."""
    import napari_mias_sam.pipeline.segment as pipeline

    monkeypatch.setattr(backbones_mod, "load_backbone", fake_load)
    real = pipeline.RunSetup.segment  # one volume of a run (jobs.run.run)

    def failing(setup, vol, *a, **k):
        if vol.path.name == "case2.nii.gz":
            raise np.linalg.LinAlgError("SVD did not converge")
        return real(setup, vol, *a, **k)

    monkeypatch.setattr(pipeline.RunSetup, "segment", failing)
    out = tmp_path / "out"
    case, case2 = world["cases"] / "case.nii.gz", world["cases"] / "case2.nii.gz"
    rc = main(["segment", str(case2), str(case), "--bank", str(world["bank"]), "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 2
    line = one_line_error(cap.err, "segment")
    assert "1 of 2 volumes failed" in line and "case2.nii.gz: SVD did not converge" in line and "Finished, with complete outputs: case.nii.gz" in line
    assert entries(out) == {"case_mask.nii.gz", "case_anomaly.nii.gz", "case_points.csv"}
    # --json reports both
    out2 = tmp_path / "out2"
    rc = main(["segment", str(case2), str(case), "--bank", str(world["bank"]), "--out", str(out2), "--json"])
    cap = capsys.readouterr()
    rep = json.loads(cap.out)
    assert rc == 2 and [r["volume"] for r in rep["results"]] == [str(case)] and rep["failed"][0]["volume"] == str(case2)


# --------------------------------------------------------------------------- umask
def test_outputs_and_banks_follow_the_umask(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_load)
    old = os.umask(0o022)
    try:
        assert main(["segment", str(world["cases"] / "case.nii.gz"), "--bank", str(world["bank"]), "--out", str(tmp_path / "o")]) == 0
        assert main(["build-bank", str(world["normals"]), "--out", str(tmp_path / "b"), "--layout", "mean256"]) == 0
        os.umask(0o027)
        assert main(["segment", str(world["cases"] / "case2.nii.gz"), "--bank", str(world["bank"]), "--out", str(tmp_path / "o")]) == 0
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for n in ("case_mask.nii.gz", "case_anomaly.nii.gz", "case_points.csv"):
        assert mode(tmp_path / "o" / n) == 0o644, n
        assert mode(tmp_path / "o" / n.replace("case", "case2")) == 0o640, n
    assert mode(tmp_path / "o") == 0o755
    assert mode(tmp_path / "b") == 0o755 and mode(tmp_path / "b" / "index.faiss") == 0o644 and mode(tmp_path / "b" / "manifest.json") == 0o644


# --------------------------------------------------------------------------- subprocess runs
def run_cli(args: list[str], env_extra: dict | None = None, **popen) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(env_extra or {})
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, str(RUNNER), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name or p.name.endswith(".lock") or p.name.endswith(".old"))


def test_two_runs_claiming_the_same_outputs_never_both_succeed(world, tmp_path):
    """Two segment runs started together into one --out, the same stem (three such pairs at once):
    in each pair exactly one succeeds, the other is refused with one line (busy, or already exists)
    and the folder holds one complete set of outputs."""
    trials = []
    for trial in range(3):
        out = tmp_path / f"out{trial}"
        args = ["segment", str(world["cases"] / "case.nii.gz"), "--bank", str(world["bank"]), "--out", str(out), "--json"]
        trials.append((out, [run_cli(args, {"MIAS_TEST_SLEEP": "1.0"}) for _ in range(2)]))
    for out, procs in trials:
        results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
        assert sorted(r[0] for r in results) == [0, 2], results
        line = one_line_error(next(r for r in results if r[0] == 2)[2], "segment")
        assert "another mias-sam run is writing" in line or "already exists" in line
        winner = json.loads(next(r for r in results if r[0] == 0)[1])
        assert sorted(p.name for p in out.iterdir()) == ["case_anomaly.nii.gz", "case_mask.nii.gz", "case_points.csv"]
        assert set(winner["outputs"].values()) == {str(out / n) for n in ("case_mask.nii.gz", "case_anomaly.nii.gz", "case_points.csv")}


def test_a_run_refused_while_another_holds_the_claim_with_overwrite(world, tmp_path, monkeypatch, capsys):
    """With --overwrite too: while one run holds the claim on a stem, another is refused."""
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_load)
    out = tmp_path / "out"
    args = ["segment", str(world["cases"] / "case.nii.gz"), "--bank", str(world["bank"]), "--out", str(out), "--overwrite"]
    first = run_cli(args, {"MIAS_TEST_SLEEP": "6"})  # holds its claim for 6 s (while 'loading the backbone')
    deadline = time.time() + 120
    while not (out / ".case.mias-sam.lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    rc2 = main(args)  # in this process: no start-up time, so surely within those 6 s
    err2 = capsys.readouterr().err
    rc1 = first.wait(timeout=240)
    assert rc1 == 0 and rc2 == 2, first.communicate()
    assert "another mias-sam run is writing the outputs 'case'" in one_line_error(err2, "segment")
    assert leftovers(out) == []


SEGMENT_KILLS = [("save_nifti", 2, "TERM"), ("save_nifti", 2, "KILL"), ("save_nifti", 1, "INT"), ("commit", 1, "TERM"),
                 ("commit", 1, "KILL"), ("link", 1, "KILL"), ("link", 2, "TERM"), ("link", 2, "KILL"), ("link", 3, "INT")]
BANK_KILLS = [("write_index", 1, "TERM"), ("write_index", 1, "KILL"), ("commit", 1, "KILL"), ("replace", 1, "KILL"),
              ("replace", 2, "TERM"), ("replace", 2, "KILL")]


@pytest.fixture(scope="module")
def killed_runs(world, tmp_path_factory) -> dict:
    """Every kill scenario below, run at once (one subprocess each, in its own folder): a segment
    into a folder holding a file of the user's, and a bank replaced with --overwrite."""
    root = tmp_path_factory.mktemp("killed")
    runs = {}
    for where, nth, sig in SEGMENT_KILLS:
        out = root / f"seg-{where}{nth}-{sig}"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        args = ["segment", str(world["cases"] / "case.nii.gz"), "--bank", str(world["bank"]), "--out", str(out)]
        runs[("segment", where, nth, sig)] = (out, None, run_cli(args, {"MIAS_TEST_KILL": f"{where}:{nth}:{sig}"}))
    for where, nth, sig in BANK_KILLS:
        banks = root / f"bank-{where}{nth}-{sig}"
        banks.mkdir()
        shutil.copytree(world["bank"], banks / "b")
        before = snapshot(banks / "b")
        args = ["build-bank", str(world["normals"]), "--out", str(banks / "b"), "--layout", "paper1024", "--overwrite"]
        runs[("bank", where, nth, sig)] = (banks, before, run_cli(args, {"MIAS_TEST_KILL": f"{where}:{nth}:{sig}"}))
    done = {}
    for key, (folder, before, p) in runs.items():
        rc = p.wait(timeout=600)
        _, err = p.communicate()
        done[key] = {"folder": folder, "before": before, "rc": rc, "err": err, "leftovers": leftovers(folder)}
    return done


@pytest.mark.parametrize("where, nth, sig", SEGMENT_KILLS, ids=[f"{w}{n}-SIG{s}" for w, n, s in SEGMENT_KILLS])
def test_killed_segment_write_leaves_no_half_outputs(world, killed_runs, monkeypatch, where, nth, sig):
    """SIGTERM / SIGINT: the run cleans up at once (inside the final moves the signal waits for them).
    SIGKILL: the next save into the folder removes the leftovers and finishes a commit that had
    begun. Either way every output set there is whole, or absent."""
    r = killed_runs[("segment", where, nth, sig)]
    out = r["folder"]
    names = {"case_mask.nii.gz", "case_anomaly.nii.gz", "case_points.csv"}
    expected = names if where == "link" else set()  # the commit had begun: it is finished
    if sig == "KILL":
        assert r["rc"] == -signal.SIGKILL
        assert r["leftovers"]  # what a killed run leaves: its lock and temporaries
    else:
        assert r["rc"] == 128 + getattr(signal, f"SIG{sig}"), r["err"]
        assert "stopped by SIG" in r["err"].strip().splitlines()[-1]
        assert r["leftovers"] == []
        assert {q.name for q in out.iterdir()} & names == expected
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_load)
    assert main(["segment", str(world["cases"] / "case2.nii.gz"), "--bank", str(world["bank"]), "--out", str(out)]) == 0
    assert leftovers(out) == []
    assert {q.name for q in out.iterdir()} & names == expected
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("where, nth, sig", BANK_KILLS, ids=[f"{w}{n}-SIG{s}" for w, n, s in BANK_KILLS])
def test_killed_bank_save_leaves_no_part_and_never_loses_the_old_bank(world, killed_runs, monkeypatch, where, nth, sig):
    """An existing bank replaced with --overwrite, stopped at several points: after the next save
    into the folder it is the old bank or the new one, whole, and no temporary is left."""
    r = killed_runs[("bank", where, nth, sig)]
    banks, target = r["folder"], r["folder"] / "b"
    if sig == "KILL":
        assert r["rc"] == -signal.SIGKILL
        assert r["leftovers"]
    else:
        assert r["rc"] == 143, r["err"]
        assert r["leftovers"] == []
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_load)
    assert main(["build-bank", str(world["normals"]), "--out", str(banks / "c"), "--layout", "mean256"]) == 0
    assert leftovers(banks) == []
    assert sorted(q.name for q in banks.iterdir()) == ["b", "c"]
    m = json.loads((target / "manifest.json").read_text())
    if where == "replace":  # the commit had begun: finished (SIGTERM waited for it; after SIGKILL the next save did)
        assert m["patch_layout"] == "paper1024" and m["index"]["ntotal"] == 6 * 1024
        assert (target / "index.faiss").stat().st_size > 6 * 1024 * 1024 * 4
    else:
        assert snapshot(target) == r["before"]  # the old bank, untouched
