"""Write a BraTS-2021-shaped training root from real healthy anatomy, to time and try the dataset
commands on BraTS-sized volumes (the real BraTS data cannot be bundled or downloaded here).

Run from the repository root (needs ``nilearn`` and Debian's ``mricron-data``, as
``tools/make_sample_data.py`` does)::

    python benchmarks/make_brats_shaped.py --out /tmp/brats-shaped --cases 3
    mias-sam build-bank /tmp/brats-shaped --modality flair --margin 2 --out /tmp/brats-bank

Each case folder ``BraTS2021_NNNNN/`` holds ``BraTS2021_NNNNN_{flair,t1,t1ce,t2,seg}.nii.gz`` on
BraTS's grid (240 x 240 x 155 voxels of 1 mm, int16 images, uint8 labels 0/1/2/4). Subjects
alternate between the MNI152 2009a template (nilearn) and Colin27 (``ch2bet``), each made a new
pseudo-subject by :func:`tools/synthetic.py pseudo_subject` (affine jitter, elastic warp,
bias field, intensity curve, noise). One synthetic glioma-sized lesion per case (radii 14-22 mm):
oedema (2) around a core (1 necrosis, 4 enhancing rim), bright on FLAIR and T2, a dark core with
an enhancing rim on T1ce. The four "sequences" are intensity curves of the same T1 anatomy: they
are shaped like BraTS, not meant to look like real FLAIR/T2 contrast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_sample_data as msd  # noqa: E402  (the sample's anatomy sources)
import synthetic  # noqa: E402  (pseudo-subjects and lesions)

SHAPE = (240, 240, 155)
SEED = 20261130


def to_grid(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre the brain's bounding box in a 240 x 240 x 155 grid (crop or zero-pad per axis)."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    out_img = np.zeros(SHAPE, np.float32)
    out_mask = np.zeros(SHAPE, bool)
    src, dst = [], []
    for a in range(3):
        n, size = hi[a] - lo[a], SHAPE[a]
        if n <= size:
            s0, d0, length = lo[a], (size - n) // 2, n
        else:  # taller than the grid: keep the middle
            s0, d0, length = lo[a] + (n - size) // 2, 0, size
        src.append(slice(s0, s0 + length))
        dst.append(slice(d0, d0 + length))
    out_img[tuple(dst)] = image[tuple(src)]
    out_mask[tuple(dst)] = mask[tuple(src)]
    return out_img, out_mask


def brats_affine() -> np.ndarray:
    """BraTS's usual orientation: LPS voxel axes (x, y flipped), 1 mm, centred."""
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    aff[:3, 3] = [120.0, 120.0, -77.0]
    return aff


def make_case(subject: msd.Subject, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, mask = synthetic.pseudo_subject(subject.image, subject.mask, rng, noise_std=0.015)
    image, mask = to_grid(image, mask)
    allowed = ndimage.binary_erosion(mask, iterations=12)
    radii = rng.uniform(14.0, 22.0, size=3)
    centre = synthetic.random_lesion_centre(allowed, radii * 0.6, rng)
    whole = synthetic.make_lesion_mask(SHAPE, centre, radii, rng) & mask
    core = ndimage.binary_erosion(whole, iterations=5)
    necrosis = ndimage.binary_erosion(core, iterations=3)
    labels = np.zeros(SHAPE, np.uint8)
    labels[whole] = 2
    labels[core] = 4
    labels[necrosis] = 1
    top = float(np.percentile(image[mask], 99.5))
    base = np.clip(image / top, 0, 1.2)
    flair = synthetic.insert_lesion(base, whole, contrast=0.7, rng=rng)
    t2 = synthetic.insert_lesion(np.where(mask, 1.25 - base, 0), whole, contrast=0.6, rng=rng)
    t1 = synthetic.insert_lesion(base, core, contrast=-0.4, rng=rng)
    t1ce = synthetic.insert_lesion(t1, core & ~necrosis, contrast=0.9, rng=rng, halo=0)
    out = {name: (np.where(mask, v, 0) * 1000).astype(np.int16) for name, v in
           {"flair": flair, "t1": t1, "t1ce": t1ce, "t2": t2}.items()}
    out["seg"] = labels
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="dataset root to write (must not exist)")
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--seed", type=int, default=SEED)
    a = p.parse_args(argv)
    if a.out.exists():
        raise SystemExit(f"{a.out}: already exists; choose another --out")
    rng = np.random.default_rng(a.seed)
    subjects = [msd.load_mni152(), msd.load_colin27()]
    affine = brats_affine()
    for i in range(a.cases):
        name = f"BraTS2021_{i + 1:05d}"
        volumes = make_case(subjects[i % 2], rng)
        folder = a.out / name
        folder.mkdir(parents=True)
        for kind, data in volumes.items():
            img = nib.Nifti1Image(data, affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            nib.save(img, str(folder / f"{name}_{kind}.nii.gz"))
        lesion = np.flatnonzero(volumes["seg"].any(axis=(0, 1)))
        print(f"{folder}: {subjects[i % 2].name} pseudo-subject, tumour on axial slices {lesion.min()}-{lesion.max()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
