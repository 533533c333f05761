"""segment_volume and its outputs with a deterministic fake backbone: empty slices, the
embedding cache, refusals before any work, written files, cancellation and re-decoding."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch

from fakes import FakeBackbone
from core_fixtures import CountingBackbone, anatomy_volume, disk, sha256, snapshot, write_nifti
from napari_mias_sam.method.anomaly import maps_from_scores
from napari_mias_sam.method.prompts import Prompt
from napari_mias_sam.bank import load_bank
from napari_mias_sam.pipeline.embedding_cache import EmbeddingCache, frames_key
from napari_mias_sam.core.errors import BankMismatchError, Cancelled, InputError
from napari_mias_sam.data.volumes import load_volume
from napari_mias_sam.method.patches import patch_features
from napari_mias_sam.pipeline.segment import encode_volume, redecode_slice, segment_volume, EncodedVolume, decode_all
from napari_mias_sam.method.preprocess import Frame, PREPROCESS_PRESETS
from napari_mias_sam.method.regions import NormalLevels, anomalous_regions, bank_levels
from napari_mias_sam.method.region_prompts import region_prompts
from napari_mias_sam.pipeline.settings import SegmentSettings
from napari_mias_sam.jobs.bank_builds import build_bank_from_files
from napari_mias_sam.jobs.outputs import check_outputs, output_paths, write_outputs

CSV_COLUMNS = ["slice", "i", "j", "k", "image_score", "predicted_iou", "anomalous", "prompt", "prompts", "mask_used", "agreement", "levels"]
AFFINE = np.array([[-1.5, 0, 0, 40.0], [0, 1.5, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two normal volumes, a fake-backbone bank, and a test volume with a blob and an empty slice."""
    root = tmp_path_factory.mktemp("pipeline")
    normals = [write_nifti(root / "normals" / f"n{i}.nii.gz", anatomy_volume((64, 64, 4), seed=i) * 300, AFFINE) for i in (1, 2)]
    fake = FakeBackbone()
    bank = build_bank_from_files(normals, fake, preprocessing=PREPROCESS_PRESETS["mri"], layout="mean256")
    bank.save(root / "bank")
    data = anatomy_volume((64, 64, 4), seed=3, blob={"centre": (40, 24), "radius": 6, "value": 1.0, "slices": [1, 2]}) * 300
    data[..., 3] = 0.0  # an empty (constant) slice inside the volume
    case = write_nifti(root / "cases" / "case.nii.gz", data, AFFINE)
    return {"root": root, "normals": normals, "fake": fake, "bank": load_bank(root / "bank"), "case": case}


def test_segment_volume_with_an_empty_slice(world):
    fake = FakeBackbone()
    vol = load_volume(world["case"])
    res = segment_volume(vol, world["bank"], fake, SegmentSettings(prompt="cog-point"))
    assert res.settings.prompt == "cog-point"  # the paper's per-slice prompt, on request
    assert res.n_slices == 4 and res.axis == 2
    assert res.maps.shape == (4, 256, 256) and res.scores.shape == (4, 32, 32)
    # the empty slice: no prompt, no mask, no map, NaN IoUs, nothing decoded for it
    assert res.prompts[3] is None and not res.encoded.foreground[3]
    assert (res.maps[3] == 0).all() and np.isnan(res.ious[3]).all() and (res.logits[3] == 0).all()
    assert fake.decode_calls == 3
    mask = res.mask_volume()
    assert mask.shape == (64, 64, 4) and mask.dtype == np.uint8
    assert not mask[..., 3].any() and (res.anomaly_volume()[..., 3] == 0).all()
    # the other slices: a point prompt at the CoG of the calibrated map, decoded by the fake
    for s in range(3):
        assert res.prompts[s] is not None and res.prompts[s].kind == "point"
        np.testing.assert_allclose(res.ious[s], [0.5, 0.6, 0.7])
    # the raw maps are the upsampled, smoothed patch scores, the image score their maximum
    np.testing.assert_allclose(res.raw_maps, maps_from_scores(res.scores), rtol=1e-6)
    np.testing.assert_allclose(res.image_scores, res.scores.reshape(4, -1).max(axis=1))
    cal = world["bank"].calibration(1)
    expected = np.clip((res.raw_maps[:3] - cal.low) / (cal.high - cal.low), 0, None)
    np.testing.assert_allclose(res.maps[:3], expected, rtol=1e-5, atol=1e-6)
    # the patch scores are the squared distances of the slice's patches to the bank (faiss's search;
    # within float32 rounding of the float64 distances, ~2e-4 here where squared norms reach ~180)
    feats = patch_features(res.encoded.embeddings[:1].float(), "mean256")
    np.testing.assert_allclose(res.scores[:1], world["bank"].patch_scores(feats, 1), rtol=1e-4, atol=1e-4)
    x = world["bank"].index.reconstruct_n(0, world["bank"].ntotal).astype(np.float64)
    q = feats.reshape(-1, feats.shape[-1]).numpy().astype(np.float64)
    exact = np.maximum(((q**2).sum(1)[:, None] + (x**2).sum(1)[None] - 2 * q @ x.T).min(1), 0)
    np.testing.assert_allclose(res.scores[:1].ravel(), exact, rtol=1e-3, atol=1e-3)


def test_points_rows_map_the_prompt_back_to_voxels(world):
    res = segment_volume(load_volume(world["case"]), world["bank"], FakeBackbone(), SegmentSettings(prompt="cog-box"))
    rows = res.points_rows()
    assert [r["slice"] for r in rows] == [0, 1, 2, 3] and list(rows[0]) == CSV_COLUMNS
    assert rows[3]["prompt"] == "none" and rows[3]["i"] == "" and rows[3]["anomalous"] == 0
    for s in range(3):
        x0, y0, x1, y1 = res.prompts[s].box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        # frame (256) -> slice (64) pixel centres: (v + 0.5) / 4 - 0.5 ; axis 2 -> (i, j, k) = (row, col, s)
        assert rows[s]["i"] == round((cy + 0.5) / 4 - 0.5, 2)
        assert rows[s]["j"] == round((cx + 0.5) / 4 - 0.5, 2)
        assert rows[s]["k"] == s and rows[s]["prompt"] == "box" and rows[s]["predicted_iou"] == 0.7


def test_constant_volume_is_an_input_error(world, tmp_path):
    p = write_nifti(tmp_path / "flat.nii.gz", np.full((16, 16, 3), 42.0, np.float32))
    before = sha256(p)
    fake = FakeBackbone()
    with pytest.raises(InputError, match=r"flat\.nii\.gz: every voxel has the same value \(42\)"):
        segment_volume(load_volume(p), world["bank"], fake)
    assert fake.calls == 0 and sha256(p) == before


def test_bank_of_another_backbone_is_refused_before_any_work(world):
    other = FakeBackbone(sha="other-weights-9999")
    with pytest.raises(BankMismatchError, match="fake-weights.*other-weight"):
        segment_volume(load_volume(world["case"]), world["bank"], other)
    assert other.calls == 0


def test_cancel_stops_the_run(world):
    seen = []

    def progress(stage, done, total):
        seen.append(stage)

    with pytest.raises(Cancelled):
        segment_volume(load_volume(world["case"]), world["bank"], FakeBackbone(), progress=progress, cancelled=lambda: True)
    assert seen == []


def test_redecode_slice_with_a_moved_point(world):
    fake = FakeBackbone()
    res = segment_volume(load_volume(world["case"]), world["bank"], fake, SegmentSettings(prompt="cog-point"))
    before = (list(res.prompts), res.logits.copy(), res.ious.copy(), res.settings)
    d = redecode_slice(res, fake, 1, point=(100.0, 50.0))
    assert d.s == 1 and d.prompt == Prompt("point", point=(100.0, 50.0))
    m3 = d.logits[2] > 0  # the fake's finest mask: the square of half-side 4 around the point
    rows, cols = np.nonzero(m3)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (46, 54, 96, 104)
    # a new slice result: the result itself is left as it was
    same_prompts = [a is b for a, b in zip(res.prompts, before[0])]
    assert all(same_prompts) and np.array_equal(res.logits, before[1]) and res.settings is before[3]
    res.apply(d)
    assert res.prompts[1] == d.prompt and np.array_equal(res.logits[1], d.logits) and np.array_equal(res.ious[1], d.ious)
    d = redecode_slice(res, fake, 1, settings=res.settings.replace(prompt="cog-box"), point=(100.0, 50.0))
    x0, y0, x1, y1 = d.prompt.box  # box re-centred on the point, same size
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx((100.0, 50.0))
    assert d.settings.prompt == "cog-box" and res.settings.prompt == "cog-point"
    n_before = fake.decode_calls
    d = redecode_slice(res, fake, 3, point=(10.0, 10.0))  # the empty slice stays empty
    assert d.prompt is None and fake.decode_calls == n_before


# --------------------------------------------------------------------------- outputs
def test_write_outputs_and_refusals(world, tmp_path):
    vol = load_volume(world["case"])
    res = segment_volume(vol, world["bank"], FakeBackbone())
    out = tmp_path / "out"
    paths = write_outputs(res, out)
    assert sorted(p.name for p in out.iterdir()) == ["case_anomaly.nii.gz", "case_lesions.csv", "case_lesions.nii.gz", "case_mask.nii.gz",
                                                     "case_points.csv"]
    m, a = nib.load(str(paths["mask"])), nib.load(str(paths["anomaly"]))
    assert m.get_data_dtype() == np.uint8 and a.get_data_dtype() == np.float32
    np.testing.assert_allclose(m.affine, AFFINE)
    np.testing.assert_allclose(a.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(m.dataobj), res.mask_volume())
    np.testing.assert_array_equal(np.asarray(a.dataobj), res.anomaly_volume())
    with open(paths["points"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and list(rows[0]) == CSV_COLUMNS

    # existing outputs without overwrite: refused, nothing changed
    before = snapshot(out)
    with pytest.raises(InputError, match="already exists"):
        write_outputs(res, out)
    assert snapshot(out) == before
    write_outputs(res, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["case_anomaly.nii.gz", "case_lesions.csv", "case_lesions.nii.gz", "case_mask.nii.gz",
                                                     "case_points.csv"]

    # an output that would replace an input
    inputs_before = snapshot(world["root"] / "cases")
    victim = world["root"] / "cases" / "x_mask.nii.gz"
    with pytest.raises(InputError, match="would overwrite an input"):
        check_outputs(output_paths(world["root"] / "cases", "x"), [world["case"], victim], overwrite=True)
    assert snapshot(world["root"] / "cases") == inputs_before


def test_failed_output_write_leaves_no_partial_set(world, tmp_path, monkeypatch):
    from napari_mias_sam.jobs import outputs as file_steps

    res = segment_volume(load_volume(world["case"]), world["bank"], FakeBackbone())
    real_save = file_steps.save_nifti
    calls = []

    def failing_second_save(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the mask is written, then the anomaly map fails
            raise OSError("disk full")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(file_steps, "save_nifti", failing_second_save)
    with pytest.raises(OSError, match="disk full"):
        write_outputs(res, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing, not even the folder the write created

    # With --overwrite, a failed run keeps the earlier outputs byte for byte.
    monkeypatch.setattr(file_steps, "save_nifti", real_save)
    paths = write_outputs(res, tmp_path / "out2")
    before = {p.name: p.read_bytes() for p in paths.values()}
    calls.clear()
    monkeypatch.setattr(file_steps, "save_nifti", failing_second_save)
    with pytest.raises(OSError, match="disk full"):
        write_outputs(res, tmp_path / "out2", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out2").iterdir()} == before


# --------------------------------------------------------------------------- embedding cache
def test_cache_put_get_round_trip_and_keys(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    emb = torch.randn(2, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    cache.put("k1", emb)
    got = cache.get("k1")
    assert got.dtype == torch.float16 and got.shape == (2, 256, 64, 64)
    torch.testing.assert_close(got, emb.half(), rtol=0, atol=0)
    assert cache.get("missing") is None
    assert cache.size_bytes() > 2 * 256 * 64 * 64 * 2 - 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k1.npy"]

    frames = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(1))
    info = {"name": "litemedsam", "weights_sha256": "abc"}
    k = frames_key(frames, info)
    assert k == frames_key(frames.clone(), dict(info)) and len(k) == 64
    changed = frames.clone()
    changed[2, 100, 100] += 1e-3
    assert frames_key(changed, info) != k
    assert frames_key(frames[:2], info) != k
    assert frames_key(frames, dict(info, weights_sha256="abd")) != k
    assert frames_key(frames, dict(info, name="sam-vit_b")) != k
    assert frames_key(frames, info, precision="bf16") != k
    # the reference encoding has its own keys (standard keys are unchanged) and keeps float32
    assert frames_key(frames, dict(info, encoding="standard")) == k
    assert frames_key(frames, dict(info, encoding="reference")) != k
    cache.put("k2", emb, dtype=torch.float32)
    got32 = cache.get("k2")
    assert got32.dtype == torch.float32 and torch.equal(got32, emb)
    assert cache.clear() == 2 and cache.get("k1") is None


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "pickle-header"])
def test_damaged_cache_entry_is_ignored_and_recomputed(world, tmp_path, damage):
    cache = EmbeddingCache(tmp_path / "cache")
    bb = CountingBackbone(FakeBackbone())
    vol = load_volume(world["case"])
    prep = PREPROCESS_PRESETS["mri"]
    first = encode_volume(vol, bb, prep, cache=cache)
    assert bb.encode_calls == 1 and not first.from_cache
    path = cache.path(first.key)
    blob = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncated":
        path.write_bytes(blob[: len(blob) // 3])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(blob[:6] + b"\x01\x00" + blob[8:64])  # npy magic, then nonsense
    assert cache.get(first.key) is None and not path.exists()  # forgotten
    path.write_bytes(b"" if damage == "empty" else blob[: len(blob) // 3])
    again = encode_volume(vol, bb, prep, cache=cache)
    assert bb.encode_calls == 2 and not again.from_cache  # recomputed
    torch.testing.assert_close(again.embeddings, first.embeddings)
    assert path.read_bytes() == blob  # and stored again, whole
    third = encode_volume(vol, bb, prep, cache=cache)
    assert third.from_cache and bb.encode_calls == 2


def test_segment_volume_reuses_cached_embeddings(world, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    bb = CountingBackbone(FakeBackbone())
    vol = load_volume(world["case"])
    r1 = segment_volume(vol, world["bank"], bb, cache=cache)
    assert bb.encode_calls >= 1 and not r1.encoded.from_cache
    calls = bb.encode_calls
    r2 = segment_volume(load_volume(world["case"]), world["bank"], bb, cache=cache)
    assert bb.encode_calls == calls and r2.encoded.from_cache  # no encoder work the second time
    np.testing.assert_array_equal(r1.mask_volume(), r2.mask_volume())
    np.testing.assert_array_equal(r1.anomaly_volume(), r2.anomaly_volume())
    # another backbone identity never reads these entries
    other = CountingBackbone(FakeBackbone(sha="other"))
    encode_volume(vol, other, PREPROCESS_PRESETS["mri"], cache=cache)
    assert other.encode_calls >= 1


def test_second_bank_from_the_cache_skips_the_encoder_and_matches(world, tmp_path):
    """build-bank --cache: a bank of another layout from the same volumes reads the cached
    embeddings (no encode call) and equals a build from them; a cached re-build is identical."""
    cache = EmbeddingCache(tmp_path / "cache")
    bb = CountingBackbone(FakeBackbone())
    prep = PREPROCESS_PRESETS["mri"]
    first = build_bank_from_files(world["normals"], bb, preprocessing=prep, layout="paper1024", cache=cache)
    calls = bb.encode_calls
    assert calls > 0 and len(list((tmp_path / "cache").glob("*.npy"))) == calls
    second = build_bank_from_files(world["normals"], bb, preprocessing=prep, layout="mean256", cache=cache)
    again = build_bank_from_files(world["normals"], bb, preprocessing=prep, layout="paper1024", cache=cache)
    assert bb.encode_calls == calls  # both from the cache
    assert second.layout == "mean256" and second.ntotal == first.ntotal
    from napari_mias_sam.bank.knn import index_vectors

    np.testing.assert_array_equal(index_vectors(again.index, 0, again.ntotal), index_vectors(first.index, 0, first.ntotal))


def test_rerun_reuses_the_anomaly_maps_when_bank_and_k_are_unchanged(world, monkeypatch):
    """A rerun with an earlier result: same slices, bank and k -> no encoder and no kNN search
    (only normalisation, prompts and decoding), and the same maps and masks as a full run; another
    k, another bank or other slices -> the search runs."""
    bank = world["bank"]
    searches = []
    search = bank.search
    monkeypatch.setattr(bank, "search", lambda *a, **k: (searches.append(1), search(*a, **k))[1])
    bb = CountingBackbone(FakeBackbone())
    vol = load_volume(world["case"])
    first = segment_volume(vol, bank, bb)
    n_search, n_encode = len(searches), bb.encode_calls
    assert n_search > 0 and not first.maps_reused
    again = segment_volume(load_volume(world["case"]), bank, bb, SegmentSettings(gamma=2.0, normalisation="reference"),
                           reuse=first)
    assert again.maps_reused and len(searches) == n_search and bb.encode_calls == n_encode
    full = segment_volume(load_volume(world["case"]), bank, FakeBackbone(), SegmentSettings(gamma=2.0, normalisation="reference"))
    np.testing.assert_array_equal(again.maps, full.maps)
    np.testing.assert_array_equal(again.mask_volume(), full.mask_volume())
    # k changed: the search runs again (the embeddings are still reused)
    k2 = segment_volume(load_volume(world["case"]), bank, bb, SegmentSettings(k=2), reuse=first)
    assert not k2.maps_reused and len(searches) > n_search and bb.encode_calls == n_encode
    # other slices (another volume): nothing is reused
    other = load_volume(world["normals"][0])
    r = segment_volume(other, bank, bb, reuse=first)
    assert not r.maps_reused and bb.encode_calls > n_encode


def test_regions_prompt_uses_bank_levels_only(world):
    """The regions prompt: regions found with levels from the bank's calibration only; one
    decode per region piece; slices without a region get no prompt, no decision and no mask."""
    fake = FakeBackbone()
    res = segment_volume(load_volume(world["case"]), world["bank"], fake, SegmentSettings(prompt="regions"))
    assert res.settings.prompt == "regions"
    assert res.region_levels == bank_levels(world["bank"], 1)
    assert res.metadata()["region_levels"] == res.region_levels.as_dict()
    pieces = [region_prompts(res.regions[s], res.maps[s], gamma=res.settings.gamma, kind="point") for s in range(4)]
    assert fake.decode_calls == sum(len(p) for p in pieces) > 0
    rows = res.points_rows()
    for s in range(4):
        has = bool(pieces[s])
        assert (res.prompts[s] is not None) == has and bool(res.decision[s]) == has
        # the CoG layer's points are the prompts sent: each piece's gamma-weighted centre of gravity
        assert [res._frame_to_voxel(s, *p.centre) for p in pieces[s]] == res.prompt_centres(s)
        assert rows[s]["prompts"] == len(pieces[s])
        if has:
            assert set(rows[s]["mask_used"].split(";")) <= {"1", "2", "3", "region"} and rows[s]["agreement"]
        else:
            assert not res.mask_volume()[..., s].any() and rows[s]["prompt"] == "none"


def test_regions_with_a_small_bank_use_the_gamma_cog_and_gamma_moves_it(world):
    """This small bank (2 subjects, a few held-out slices) gets the regions prompt by default, on
    the small-bank levels (pixel percentiles of its held-out maps), each prompt the gamma-weighted
    CoG of its piece, and another gamma moves the points and changes the masks."""
    from napari_mias_sam.method.regions import MIN_NORMAL_PEAKS, normal_peak_count

    bank = world["bank"]
    assert normal_peak_count(bank) < MIN_NORMAL_PEAKS and bank_levels(bank).method == "pixel"
    discs = dict(masks="discs", radii=(110.0, 80.0, 50.0))  # masks that follow the point and agree with the map
    res = segment_volume(load_volume(world["case"]), bank, FakeBackbone(**discs))
    assert res.settings.prompt == "regions" and res.settings.gamma == 5.0 and res.settings.mask_index == 1
    assert res.prompts[3] is None and not res.mask_volume()[..., 3].any()  # the empty slice: nothing
    other = segment_volume(load_volume(world["case"]), bank, FakeBackbone(**discs), SegmentSettings(prompt="regions", gamma=1.0),
                           reuse=res)
    s = next(s for s in range(4) if res.prompts[s] is not None)
    assert np.abs(np.subtract(other.prompt_centres(s), res.prompt_centres(s))).max() > 1.0
    assert (other.mask_volume() != res.mask_volume()).any()


def test_two_lesions_on_one_slice_get_two_boxes_and_normal_slices_nothing():
    """decode_all with the regions prompt: each region piece gets its own prompt (a point at the
    piece's gamma-weighted CoG for a point backbone), masks united."""
    maps = np.zeros((3, 256, 256), np.float32)
    maps[1] = 2.0 * disk((256, 256), (60, 60), 20) + 1.8 * disk((256, 256), (180, 190), 25)
    maps[0] = 0.9 * disk((256, 256), (128, 128), 30)  # raised, but no higher than normal peaks
    levels = NormalLevels(seed=1.2, extent=0.8, extent_quantile=50.0)
    regions = anomalous_regions(maps, levels)
    enc = EncodedVolume(torch.zeros(3, 256, 64, 64), torch.zeros(3, 256, 256), np.ones(3, bool), 0, Frame(256, 256), "")
    fake = FakeBackbone()
    prompts, logits, ious = decode_all(enc, maps, fake, SegmentSettings(prompt="regions"), regions=regions)
    assert prompts[0] is None and prompts[2] is None and (logits[[0, 2]] == 0).all()
    assert prompts[1].kind == "points" and len(prompts[1].points) == 2 and fake.decode_calls == 2
    (x, y), (u, v) = prompts[1].points  # most anomalous first, each its disc's centre of gravity
    assert (x, y) == pytest.approx((60.0, 60.0)) and (u, v) == pytest.approx((190.0, 180.0))
    m3 = logits[1, 2] > 0  # the fake's mask = a square around its point, inside its region
    assert m3[60, 60] and m3[180, 190] and not m3[128, 128]
    np.testing.assert_allclose(ious[1], [0.5, 0.6, 0.7])


def test_reopened_volume_reads_its_neighbour_distances_from_the_cache(world, tmp_path, monkeypatch):
    """A volume opened again with the same bank and k (a new session: no earlier result to reuse)
    waits on neither the encoder nor the search: the distances come from the cache, and the
    result is the same. Another k or another bank searches."""
    cache = EmbeddingCache(tmp_path / "cache")
    bank = world["bank"]
    searches = []
    search = bank.search
    monkeypatch.setattr(bank, "search", lambda *a, **k: (searches.append(1), search(*a, **k))[1])
    bb = CountingBackbone(FakeBackbone())
    first = segment_volume(load_volume(world["case"]), bank, bb, cache=cache)
    n_search, n_encode = len(searches), bb.encode_calls
    assert n_search > 0 and n_encode > 0 and any(p.name.startswith("knn-") for p in (tmp_path / "cache").iterdir())
    again = segment_volume(load_volume(world["case"]), bank, bb, cache=cache)
    assert len(searches) == n_search and bb.encode_calls == n_encode and again.encoded.from_cache
    np.testing.assert_array_equal(again.scores, first.scores)
    np.testing.assert_array_equal(again.mask_volume(), first.mask_volume())
    segment_volume(load_volume(world["case"]), bank, bb, SegmentSettings(k=2), cache=cache)
    assert len(searches) > n_search  # another k: another search
    n_search = len(searches)
    other = build_bank_from_files(world["normals"], FakeBackbone(), preprocessing=PREPROCESS_PRESETS["mri"], layout="mean256")
    searched = []
    osearch = other.search
    monkeypatch.setattr(other, "search", lambda *a, **k: (searched.append(1), osearch(*a, **k))[1])
    segment_volume(load_volume(world["case"]), other, bb, cache=cache)
    assert searched  # another bank (built anew: another manifest) never reads these distances


def test_a_small_bank_without_pixel_percentiles_warns_that_volumes_get_the_per_slice_prompt(sample_bank, lite_backbone):
    """A small bank built before the pixel percentiles were recorded cannot place region levels: the
    volumes' default falls back to the per-slice prompt, and the run says so and how to fix it."""
    import copy
    import warnings

    from napari_mias_sam.bank import MemoryBank
    from napari_mias_sam.pipeline.segment import setup_run

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bank as built today: the regions default, no warning
        assert setup_run(sample_bank, lite_backbone).settings.prompt == "regions"
    manifest = copy.deepcopy(sample_bank.manifest)
    for entry in manifest["calibration"]["per_k"].values():
        entry.pop("map_quantiles")
    old = MemoryBank(sample_bank.index, manifest)
    with pytest.warns(UserWarning, match="rebuild the bank with `mias-sam build-bank`"):
        setup = setup_run(old, lite_backbone)
    assert setup.settings.prompt == "cog-box"
    empty = copy.deepcopy(manifest)
    for entry in empty["calibration"]["per_k"].values():
        entry["slice_max_map"] = []  # no held-out normal slice at all: a different reason, the same advice
    with pytest.warns(UserWarning, match="holds no held-out normal slices.*rebuild the bank"):
        assert setup_run(MemoryBank(sample_bank.index, empty), lite_backbone).settings.prompt == "cog-box"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt the user chose, or a slice set: nothing to say
        assert setup_run(old, lite_backbone, SegmentSettings(prompt="cog-box")).settings.prompt == "cog-box"
        assert setup_run(old, lite_backbone, slice_set=True).settings.prompt == "cog-box"
