"""The reliability catalogue (issues 14 and 26): what a careless or unlucky user can feed the CLI.

One table, :data:`CASES`: bad volumes and ground truths, damaged or foreign banks, output
locations that are files / under files / immutable, existing outputs, bad options and resource
limits, missing or garbage weights. Each case runs ``mias-sam`` in-process with the fake backbone
(tests/fakes.py) on tiny volumes and asserts the exit code, the one-line message, that
every input is byte-identical afterwards and that nothing stray was left (no output, no
temporary, no lock). Beside the table: a batch where one volume fails during the work, two runs
racing for the same outputs (subprocesses), SIGTERM / SIGINT / SIGKILL at several points of a
bank save and of a segment write (subprocesses), and the user's umask on created files.

Round two (issue 26, :data:`ROUND_TWO`): the newer entry points: weights files that are not
checkpoints, cache limits and cache folders, lesion labels the ground truth does not hold, dataset
roots (margins, outputs inside the dataset, mixed BraTS releases, files where folders are expected),
QA files cut short or holding impossible metrics. Their refusals must be the only line printed.

Every run is classified (:func:`classify`): clean refusal, legitimate success, silent wrong (exit
0 with a wrong or nonsense result, or a missing warning), wrong cause (refused, but not for the
reason the case names, or after a summary), traceback, loss (an input changed or removed) or
leftover (a stray file). A case passes when its class is the one it expects and its details hold.
``MIAS_CATALOGUE_TALLY=FILE`` appends each case's class to FILE (JSON lines) for the before/after
counts of a change: run the catalogue on the old code and on the new.
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
from napari_mias_sam.jobs.outputs import output_paths
from reliability_inputs import cache_folder, dataset_roots, qa_file, weights_file

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
    return {k: snapshot(world[k]) for k in ("normals", "cases", "bank", "datasets") if k in world}


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
        self.argv: list[str] = []

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

    def ds(self, name: str) -> Path:
        """A dataset root (or subject list) of :func:`reliability_inputs.dataset_roots`, made once."""
        if "datasets" not in self.w:
            self.w["dataset_paths"] = dataset_roots(self.w["root"] / "datasets")
            self.w["datasets"] = self.w["root"] / "datasets"
        return self.w["dataset_paths"][name]

    def ds_copy(self, name: str) -> Path:
        """A copy of a dataset root in this case's inputs (for runs that could write into it)."""
        return Path(shutil.copytree(self.ds(name), self.inp / name))

    def setenv(self, name: str, value: str) -> None:
        old = os.environ.get(name)
        os.environ[name] = value
        self.cleanups.append(lambda: os.environ.__setitem__(name, old) if old is not None else os.environ.pop(name, None))

    def cache(self, **kw) -> Path:
        """A private cache folder (``tmp/cache``) with embeddings, an ONNX export and a weights file."""
        root = cache_folder(self.tmp, **kw)
        self.setenv("MIAS_SAM_CACHE", str(root))
        return root


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
    alone: bool = False  # a refusal must be the only line on stderr (before any summary or estimate)
    check: Callable[[Ctx, object], str | None] | None = None  # for rc 0: what is wrong with the result, or None
    owned: tuple[str, ...] = ()  # folders under the case folder that the tool may change (a private cache)


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
         creates=lambda c: {"out", "out/case_mask.nii.gz", "out/case_anomaly.nii.gz", "out/case_points.csv",
                                         "out/case_lesions.nii.gz", "out/case_lesions.csv"}),
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


# --------------------------------------------------------------------------- round two (issue 26)
def _recorded_as(backbone: str) -> Callable[[dict], None]:
    """A manifest edit: the bank says it was built with ``backbone``."""
    return lambda m: m["backbone"].update(name=backbone)


def seg_creates(stem: str) -> Callable[[Ctx], set[str]]:
    """What ``segment`` writes for ``stem`` into ``out/`` (the names ``write_outputs`` uses)."""
    return lambda c: {"out", *(f"out/{p.name}" for p in output_paths("out", stem).values())}


BANK_OUT = lambda c: {"out", "out/index.faiss", "out/manifest.json"}  # noqa: E731
EVAL_ARGS = ["--gammas", "5", "--ks", "1", "--prompts", "cog-point"]


def R(id: str, argv: Callable[[Ctx], list[str]], *says: str, **kw) -> Case:
    """A round-two case: a refusal (unless ``rc=0``) that must be the only line printed."""
    return Case(id, argv, says=says, alone=True, **kw)


def W(kind: str, *says: str, **kw) -> Case:
    return R(f"weights-check-{kind}", lambda c, k=kind: ["weights", "check", str(weights_file(c.inp, k))], *says, **kw)


def K(id: str, argv: Callable[[Ctx], list[str]], *says: str, **kw) -> Case:
    """A cache case, on a private cache folder (``tmp/cache``) that the tool may change when it succeeds."""
    return R(f"cache-{id}", argv, *says, owned=("cache",) if kw.get("rc") == 0 else (), **kw)


def Q(kind: str, *says: str, **kw) -> Case:
    return R(f"qa-report-{kind}", lambda c, k=kind: ["qa-report", str(qa_file(c.inp, k))], *(("case_qa.csv",) + says), **kw)


def brats_seg(c: Ctx, *extra: str) -> list[str]:
    """segment a BraTS 2021 case folder (with its seg: labels 0/1/2/4) with the shared bank."""
    return ["segment", str(c.ds("b21") / "BraTS2021_00001"), "--bank", c.bank, "--out", str(c.out), "--modality", "flair", *extra]


def ds_eval(c: Ctx, root, *extra: str) -> list[str]:
    return ["evaluate", "--bank", c.bank, "--dataset", str(root), "--out", str(c.out), *EVAL_ARGS, *extra]


def _limit_then(c: Ctx, *args: str) -> list[str]:
    c.cache()
    assert main(["cache", "limit", "1G"]) == 0
    return ["cache", *args]


def _lists_the_cache(c: Ctx, cap) -> str | None:
    want = ("litemedsam-encoder-0123456789abcdef", "sam_vit_b_01ec64.pth", "1.0 GiB")
    missing = [w for w in want if w not in cap.out]
    return f"cache info does not list {missing}" if missing else None


def _user_files_kept(c: Ctx, cap) -> str | None:
    root = c.tmp / "cache"
    if not (root / "thesis.tex").is_file() or not (root / "scans" / "patient1.nii.gz").is_file():
        return "loss: cache clear --all removed files that mias-sam did not make (thesis.tex, scans/)"
    if (root / "embeddings").exists() and any((root / "embeddings").iterdir()) or (root / "onnx").exists():
        return "cache clear --all left the cached embeddings or ONNX exports"
    return None


def _says(*texts: str, where: str = "err") -> Callable[[Ctx, object], str | None]:
    def check(c: Ctx, cap) -> str | None:
        missing = [t for t in texts if t not in getattr(cap, where)]
        return f"the output does not say {missing}" if missing else None
    return check


ROUND_TWO: list[Case] = [
    # ---- weights files: `weights check` says what a file is, and refuses what cannot be weights
    W("empty", "empty.pth", "is empty (0 bytes"),
    W("random", "random.pth", "not a PyTorch checkpoint"),
    W("truncated", "truncated.pth", "truncated"),
    W("object", "object.pth", "Python objects"),
    W("tensor", "tensor.pth", "not a state dict"),
    W("zip", "zip.pth", "not a PyTorch checkpoint"),
    W("folder", "weights", "is a folder", "sam_vit_b_01ec64.pth"),
    W("dangling", "dangling.pth", "broken link", "moved-away.pth"),
    W("state-dict", rc=0, check=_says("state dict of 2 tensors", "--checkpoint", where="out")),
    R("weights-check-missing", lambda c: ["weights", "check", str(c.inp / "nope.pth")], "nope.pth", "no such file"),
    # (each with a bank recorded with the backbone it loads: another backbone is refused by name first)
    R("segment-checkpoint-folder", lambda c: c.seg_args(bank=c.bank_copy(_recorded_as("litemedsam"))) + ["--checkpoint",
                                                              str(weights_file(c.inp, "folder"))], "weights", "is a folder"),
    R("segment-sam-checkpoint-empty", lambda c: c.seg_args(bank=c.bank_copy(_recorded_as("sam-vit_b"))) + ["--checkpoint",
                                                                 str(weights_file(c.inp, "empty"))], "empty.pth", "is empty (0 bytes"),
    R("segment-sam-checkpoint-random", lambda c: c.seg_args(bank=c.bank_copy(_recorded_as("sam-vit_b"))) + ["--checkpoint",
                                                                  str(weights_file(c.inp, "random"))], "random.pth", "not a PyTorch checkpoint"),
    # ---- cache: limits within sane bounds, the folder's other contents, settings and environment
    K("limit-huge", lambda c: (c.cache(), ["cache", "limit", "99999999999999999999999T"])[1], "99999999999999999999999T", "larger than"),
    K("limit-inf", lambda c: (c.cache(), ["cache", "limit", "inf"])[1], "'inf'", "not a size"),
    K("limit-nan", lambda c: (c.cache(), ["cache", "limit", "nan"])[1], "'nan'", "not a size"),
    K("limit-8-bytes", lambda c: (c.cache(), ["cache", "limit", "8"])[1], "8 bytes", "8G"),
    K("limit-negative", lambda c: (c.cache(), ["cache", "limit", "-1G"])[1], "'-1G'", "negative"),
    K("limit-words", lambda c: (c.cache(), ["cache", "limit", "lots"])[1], "'lots'", "not a size"),
    K("limit-8-GiB-spelled-out", lambda c: (c.cache(), ["cache", "limit", "8 GiB"])[1], rc=0, check=_says("8.0 GiB", where="out")),
    K("limit-0", lambda c: (c.cache(), ["cache", "limit", "0"])[1], rc=0, check=_says("0 B", where="out")),
    K("info-after-limit-lists-everything", lambda c: _limit_then(c, "info"), rc=0, check=_lists_the_cache),
    K("info-json-after-limit-lists-everything", lambda c: _limit_then(c, "info", "--json"), rc=0, check=_lists_the_cache),
    K("info-env-limit-garbage", lambda c: (c.cache(), c.setenv("MIAS_SAM_CACHE_MAX_GB", "lots"), ["cache", "info"])[2],
      rc=0, warns="MIAS_SAM_CACHE_MAX_GB"),
    K("info-env-limit-negative", lambda c: (c.cache(), c.setenv("MIAS_SAM_CACHE_MAX_GB", "-3"), ["cache", "info"])[2],
      rc=0, warns="MIAS_SAM_CACHE_MAX_GB"),
    K("info-settings-corrupt", lambda c: (c.cache(settings="{oops"), ["cache", "info"])[1], rc=0, warns="cache-settings.json"),
    K("info-settings-negative", lambda c: (c.cache(settings='{"max_bytes": -5}'), ["cache", "info"])[1], rc=0,
      warns="cache-settings.json"),
    K("folder-is-a-file", lambda c: (c.setenv("MIAS_SAM_CACHE", str(c.file("cachefile"))), ["cache", "info"])[1],
      "MIAS_SAM_CACHE", "cachefile", "is a file"),
    K("clear-all-keeps-files-it-did-not-make", lambda c: (c.cache(user_files=True), ["cache", "clear", "--all"])[1], rc=0,
      check=_user_files_kept),
    # ---- lesion labels: values the ground truth holds, or a refusal / warning naming those it holds
    R("segment-lesion-labels-999", lambda c: brats_seg(c, "--lesion-labels", "999"), "999", "1, 2, 4"),
    R("segment-lesion-labels-3-on-brats2021", lambda c: brats_seg(c, "--lesion-labels", "3"), "label 3", "1, 2, 4"),
    R("segment-lesion-labels-huge", lambda c: brats_seg(c, "--lesion-labels", "99999999999999999999"), "99999999999999999999"),
    R("segment-lesion-labels-negative", lambda c: brats_seg(c, "--lesion-labels", "-1"), "'-1'", "not a label value"),
    R("segment-lesion-labels-without-ground-truth", lambda c: c.seg_args() + ["--lesion-labels", "1"], "--lesion-labels", "--gt"),
    R("segment-lesion-labels-some-absent-warns", lambda c: brats_seg(c, "--lesion-labels", "1,999"), rc=0, warns="999",
      creates=seg_creates("BraTS2021_00001_flair")),
    R("segment-lesion-labels-present", lambda c: brats_seg(c, "--lesion-labels", "1,4"), rc=0,
      creates=seg_creates("BraTS2021_00001_flair")),
    R("evaluate-dataset-lesion-labels-999", lambda c: ds_eval(c, c.ds("b21"), "--lesion-labels", "999"), "999", "1, 2, 4"),
    R("evaluate-images-lesion-labels-999", lambda c: c.eval_args() + ["--lesion-labels", "999"], "999", "holds 1"),
    # ---- dataset roots: the margin, outputs inside the dataset, mixed releases, files for folders
    R("build-bank-margin-negative", lambda c: ["build-bank", str(c.ds("b21")), "--out", str(c.out), "--margin", "-1"],
      "--margin -1"),
    R("build-bank-margin-100000", lambda c: ["build-bank", str(c.ds("b21")), "--subjects", str(c.ds("tumours")), "--out",
                                             str(c.out), "--margin", "100000"], "--margin 100000"),
    R("build-bank-margin-excludes-every-slice", lambda c: ["build-bank", str(c.ds("b21")), "--subjects", str(c.ds("tumours")),
                                                           "--out", str(c.out), "--margin", "7"], "--margin 7", "lesion"),
    R("build-bank-out-inside-the-dataset", lambda c: (lambda r: ["build-bank", str(r), "--out", str(r / "bank")])(c.ds_copy("b21")),
      "lies inside", "b21"),
    R("build-bank-out-inside-a-case-folder", lambda c: (lambda r: ["build-bank", str(r), "--out", str(r / "BraTS2021_00001" / "bank")])(
        c.ds_copy("b21")), "lies inside", "b21"),
    R("build-bank-out-inside-the-normals", lambda c: (lambda r: ["build-bank", str(r), "--out", str(r / "bank")])(
        Path(shutil.copytree(c.w["normals"], c.inp / "normals"))), "lies inside", "normals"),
    R("build-bank-mixed-releases", lambda c: ["build-bank", str(c.ds("mixed")), "--out", str(c.out)],
      "BraTS 2021", "BraTS 2023", "BraTS2021_00001", "BraTS-GLI-00002-000"),
    R("build-bank-mixed-releases-one-chosen", lambda c: ["build-bank", str(c.ds("mixed")), "--subjects", str(c.ds("mixed21")),
                                                         "--out", str(c.out), "--layout", "mean256"], rc=0, creates=BANK_OUT,
      check=_says("BraTS 2021")),
    R("build-bank-subjects-list-with-bom", lambda c: ["build-bank", str(c.ds("b21")), "--subjects", str(
        (c.inp / "subjects.txt").write_bytes(b"\xef\xbb\xbfBraTS2021_00001\r\nBraTS2021_00003\r\n") and c.inp / "subjects.txt"),
        "--out", str(c.out), "--layout", "mean256"], rc=0, creates=BANK_OUT),  # saved by Notepad: BOM and CRLF
    R("build-bank-brats2023-named", lambda c: ["build-bank", str(c.ds("b23")), "--out", str(c.out), "--layout", "mean256"],
      rc=0, creates=BANK_OUT, check=_says("BraTS 2023")),
    R("evaluate-dataset-is-a-file", lambda c: ds_eval(c, c.case), "case.nii.gz", "is a file"),
    R("evaluate-dataset-missing", lambda c: ds_eval(c, c.inp / "nope"), "nope", "no such folder"),
    R("evaluate-dataset-empty-folder", lambda c: ds_eval(c, (c.inp / "empty").mkdir() or c.inp / "empty"), "holds no dataset cases"),
    R("evaluate-dataset-mixed-releases", lambda c: ds_eval(c, c.ds("mixed")), "BraTS 2021", "BraTS 2023", "BraTS2021_00001"),
    R("segment-dataset-root", lambda c: ["segment", str(c.ds("b21")), "--bank", c.bank, "--out", str(c.out)], "holds 3 cases"),
    R("segment-bank-is-its-manifest-file", lambda c: c.seg_args(bank=str(Path(c.bank) / "manifest.json")), "manifest.json",
      "is a file"),
    R("info-bank-index-truncated", lambda c: ["info", (lambda b: (Path(b, "index.faiss").write_bytes(
        Path(b, "index.faiss").read_bytes()[:5000]), b)[1])(c.bank_copy())], "index.faiss"),
    # ---- QA files (qa-report and the viewer's reader): cut short, joined, re-saved, impossible values
    Q("cut-in-status", "line 5", "cut short"),
    Q("cut-in-volume_shape", "line 5", "cut short"),
    Q("cut-in-affine", "line 5", "cut short"),
    Q("rows-missing", "line 3", "2 of the volume's 4 slices"),
    Q("empty", "is empty (0 bytes)"),
    Q("header-only", "no rows"),
    Q("joined", " 6"),  # before: "row 6 is not a QA row"; now: "line 6: repeats the header"
    Q("semicolons", "';'"),
    Q("dice-5e300", "line 4", "slice_dice_before", "[0, 1]"),
    Q("dice-negative", "line 4", "slice_dice_after", "[0, 1]"),
    Q("volume-dice-1.5", "volume_dice_after", "[0, 1]"),
    Q("volume-dice-differs", "line 4", "volume_dice_before"),
    Q("displacement-1e308", "line 4", "displacement_mm"),
    Q("displacement-negative", "line 4", "displacement_mm"),
    Q("displacement-inf", "line 4", "displacement_mm"),
    Q("flag-7", "line 4", "in_lesion_before", "0 or 1"),
    Q("centre-outside", "line 4", "outside"),
    Q("shape-differs", "line 4", "volume_shape"),
    Q("crlf", rc=0, check=_says("| case | 3 of 3 |", where="out")),
    Q("good", rc=0, check=_says("| case | 3 of 3 |", where="out")),
]

def one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert lines[-1].startswith(f"mias-sam {command}: error: "), err
    return lines[-1]


def _under(rel: str, owned: tuple[str, ...]) -> bool:
    return any(rel == o or rel.startswith(o + os.sep) for o in owned)


def classify(case: Case, ctx: Ctx, rc, cap, exc: BaseException | None, world_same: bool,
             before_files: dict, before_entries: set) -> tuple[str, str]:
    """The class of one run and why: traceback, loss, leftover, silent wrong, wrong cause, clean
    refusal or legitimate success (in that order of precedence)."""
    if exc is not None:
        return "traceback", f"{type(exc).__name__}: {exc}"
    if "Traceback (most recent call last)" in cap.err:
        return "traceback", cap.err.strip().splitlines()[-1]
    if not world_same:
        return "loss", "a shared input (volumes, bank, dataset roots) changed"
    tmp = ctx.tmp
    if rc == 0 and case.rc != 0:  # its outputs are the wrong result, not strays
        return "silent wrong", f"exited 0 where a refusal ({', '.join(case.says)}) was due"
    added = case.creates(ctx) if case.creates and rc == 0 else set()
    now = snapshot(tmp)
    changed = sorted(k for k, v in before_files.items() if k not in added and not _under(k, case.owned) and now.get(k) != v)
    if changed:
        return "loss", f"inputs changed or removed: {changed}"
    stray = sorted(e for e in entries(tmp) - before_entries - added if not _under(e, case.owned))
    if stray:
        return "leftover", f"stray entries: {stray}"
    lines = cap.err.strip().splitlines()
    if rc == 0:
        if case.warns and case.warns not in cap.err:
            return "silent wrong", f"no warning naming {case.warns!r}"
        problem = case.check(ctx, cap) if case.check else None
        if problem:
            return ("loss" if problem.startswith("loss:") else "silent wrong"), problem
        return "legitimate success", ""
    if case.rc == 0:
        return "wrong cause", f"refused a legitimate input (rc {rc}): {lines[-1] if lines else ''}"
    command = ctx.argv[0]
    errors = [ln for ln in lines if "error" in ln]
    if rc != case.rc or cap.out or not lines or len(errors) != 1 or lines[-1] != errors[0] \
            or not lines[-1].startswith(f"mias-sam {command}: error: "):
        return "wrong cause", f"rc {rc}, stdout {cap.out[:80]!r}, stderr {lines[-3:]}"
    if case.alone and len(lines) != 1:
        return "wrong cause", f"printed before the refusal: {lines[:-1]}"
    missing = [t for t in case.says if t not in lines[-1]]
    if missing:
        return "wrong cause", f"{lines[-1]} (does not say {missing})"
    return "clean refusal", lines[-1]


def run_case(case: Case, world, tmp_path, monkeypatch, capsys) -> tuple[str, str]:
    """Run one case in-process and classify it (every input watched, every cleanup run)."""
    monkeypatch.setattr(backbones_mod, "load_backbone", case.loader)
    ctx = Ctx(world, tmp_path)
    exc = None
    try:
        ctx.argv = case.argv(ctx)
        before_world, before_files, before_entries = watched(world), snapshot(tmp_path), entries(tmp_path)
        capsys.readouterr()
        try:
            rc = main(ctx.argv)
        except SystemExit as e:  # argparse's own refusals (usage and one error line)
            rc = e.code
        except BaseException as e:  # noqa: BLE001 - a traceback is a class of its own
            rc, exc = None, e
        cap = capsys.readouterr()
        world_same = watched(world) == before_world
        result = classify(case, ctx, rc, cap, exc, world_same, before_files, before_entries)
    finally:
        for undo in ctx.cleanups:
            undo()
    tally = os.environ.get("MIAS_CATALOGUE_TALLY")
    if tally:
        with open(tally, "a") as fh:
            fh.write(json.dumps({"id": case.id, "round": 2 if case in ROUND_TWO else 1,
                                 "expected": "clean refusal" if case.rc else "legitimate success",
                                 "observed": result[0], "detail": result[1]}) + "\n")
    return result


@pytest.mark.parametrize("case", CASES + ROUND_TWO, ids=[c.id for c in CASES + ROUND_TWO])
def test_catalogue(case: Case, world, tmp_path, monkeypatch, capsys):
    if case.skip:
        pytest.skip(case.skip)
    kind, why = run_case(case, world, tmp_path, monkeypatch, capsys)
    assert kind == ("clean refusal" if case.rc else "legitimate success"), f"{kind}: {why}"


def test_catalogue_size():
    """The count the report gives (one test per case above, plus the scenario tests below)."""
    assert len(CASES) == len({c.id for c in CASES}) >= 70
    every = CASES + ROUND_TWO
    assert len(every) == len({c.id for c in every}) and len(ROUND_TWO) >= 60


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
    assert entries(out) == {"case_mask.nii.gz", "case_anomaly.nii.gz", "case_points.csv", "case_lesions.nii.gz", "case_lesions.csv"}
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
    for n in ("case_mask.nii.gz", "case_anomaly.nii.gz", "case_points.csv", "case_lesions.nii.gz", "case_lesions.csv"):
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
        assert sorted(p.name for p in out.iterdir()) == ["case_anomaly.nii.gz", "case_lesions.csv", "case_lesions.nii.gz", "case_mask.nii.gz",
                                                     "case_points.csv"]
        assert set(winner["outputs"].values()) == {str(out / n) for n in ("case_mask.nii.gz", "case_anomaly.nii.gz", "case_points.csv", "case_lesions.nii.gz", "case_lesions.csv")}


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
    names = {"case_mask.nii.gz", "case_anomaly.nii.gz", "case_points.csv", "case_lesions.nii.gz", "case_lesions.csv"}
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
