"""The checkpoint registry: downloads verified against a registered hash (a real HTTP server on
127.0.0.1 serves the files), a corrupted download refused with nothing left behind, and files
given with --checkpoint named, refused or accepted with a warning."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from napari_mias_sam.backbones import weights
from napari_mias_sam.cli.commands import main
from napari_mias_sam.core.errors import WeightsError

from weights_fixtures import PAYLOAD, server, test_registry  # noqa: F401  (fixtures)


def _state_dict_file(path):
    """A real PyTorch state dict of no known model (an unknown checkpoint)."""
    torch.save({"image_encoder.neck.0.weight": torch.zeros(4, 4)}, path)
    return path


def test_builtin_registry_has_the_official_checkpoints_with_published_hashes():
    reg = {e.name: e for e in weights._BUILTIN}
    assert set(reg) == {"sam-vit_b", "sam-vit_l", "sam-vit_h", "medsam-vit_b"}
    assert reg["sam-vit_b"].hash == "sha256:ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    assert reg["sam-vit_b"].url.endswith("/sam_vit_b_01ec64.pth") and reg["sam-vit_b"].url.startswith("https://")
    for e in reg.values():
        algo, _, value = e.hash.partition(":")
        assert (algo, len(value)) in (("sha256", 64), ("md5", 32)), e
        assert e.backbone in ("sam-vit_b", "sam-vit_l", "sam-vit_h")


def test_fetch_downloads_verifies_and_reuses(test_registry, server, capsys):
    _, requests = server
    assert main(["weights", "fetch", "test-ok"]) == 0
    path = weights.weights_dir() / "tiny.pth"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in weights.weights_dir().iterdir()) == ["tiny.pth"]
    assert str(path) in capsys.readouterr().out
    n = len(requests)
    assert weights.fetch("test-ok") == path  # there and verified: not downloaded again
    assert len(requests) == n
    assert weights.local_file("test-ok") == path


def test_fetch_checks_md5_entries(test_registry):
    assert weights.fetch("test-md5").read_bytes() == PAYLOAD


def test_corrupted_download_is_refused_and_nothing_is_left(test_registry, server, capsys):
    assert main(["weights", "fetch", "test-corrupt"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after the progress bar)
    assert last.startswith("mias-sam weights: error: ") and "does not match" in last and "test-corrupt" in last
    assert list(weights.weights_dir().iterdir()) == []
    assert weights.local_file("test-corrupt") is None


def test_fetch_without_a_server_says_what_to_do(test_registry, monkeypatch, tmp_path, capsys):
    reg = {"test-offline": {"variant": "vit_b", "filename": "x.pth", "url": "http://127.0.0.1:9/x.pth", "hash": None}}
    (tmp_path / "offline.json").write_text(json.dumps(reg))
    monkeypatch.setenv("MIAS_SAM_WEIGHTS_REGISTRY", str(tmp_path / "offline.json"))
    assert main(["weights", "fetch", "test-offline"]) == 2
    err = capsys.readouterr().err
    assert "cannot download" in err and "--checkpoint" in err
    assert list(weights.weights_dir().iterdir()) == []
    assert main(["weights", "fetch", "no-such-model"]) == 2
    assert "unknown weights" in capsys.readouterr().err


def test_check_names_a_known_file_and_refuses_another_architecture(test_registry, tmp_path, capsys):
    f = tmp_path / "renamed.pth"
    f.write_bytes(PAYLOAD)  # the registered bytes under another name
    assert main(["weights", "check", str(f), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["known_as"] == "test-ok"  # first entry with this hash
    assert rep["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
    entry, sha = weights.check_checkpoint(f, "vit_b")
    assert entry.name == "test-ok" and sha == rep["sha256"]
    with pytest.raises(WeightsError, match="vit_b model"):
        weights.check_checkpoint(f, "vit_h")


def test_unknown_checkpoint_is_accepted_with_a_warning(test_registry, tmp_path):
    f = _state_dict_file(tmp_path / "my_finetune.pth")
    with pytest.warns(weights.UnknownWeightsWarning, match="not a known vit_b checkpoint"):
        entry, sha = weights.check_checkpoint(f, "vit_b")
    assert entry is None and sha == hashlib.sha256(f.read_bytes()).hexdigest()
    # a file that is no PyTorch checkpoint at all is refused as such, with no warning that would use it
    garbage = tmp_path / "notes.pth"
    garbage.write_bytes(b"something else")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        weights.check_checkpoint(garbage, "vit_b")


def test_sam_backbone_names_checks_and_finds_fetched_weights(test_registry, tmp_path, capsys):
    """--checkpoint: a file that is not a checkpoint is refused before the model is built; an
    unknown checkpoint warns (one line on stderr) before it is read; a known file of another
    architecture is refused before the model is built; without --checkpoint the fetched file of
    that backbone is used."""
    from napari_mias_sam.backbones import load_backbone

    bad = tmp_path / "notes.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        load_backbone("sam-vit_b", bad, "cpu")
    other = _state_dict_file(tmp_path / "other.pth")
    with pytest.warns(weights.UnknownWeightsWarning):
        with pytest.raises(WeightsError, match="does not match the SAM vit_b architecture"):
            load_backbone("sam-vit_b", other, "cpu")
    known = tmp_path / "tiny.pth"
    known.write_bytes(PAYLOAD)
    with pytest.raises(WeightsError, match="use --backbone sam-vit_b"):
        load_backbone("sam-vit_h", known, "cpu")
    with pytest.raises(WeightsError, match="mias-sam weights fetch sam-vit_l"):
        load_backbone("sam-vit_l", None, "cpu")
    fetched = weights.weights_dir() / "sam_vit_l_0b3195.pth"  # where `weights fetch sam-vit_l` puts it
    fetched.write_bytes(b"a damaged download")
    with pytest.raises(WeightsError, match=f"{fetched}: not a PyTorch checkpoint"):
        load_backbone("sam-vit_l", None, "cpu")


def test_cli_prints_the_unknown_checkpoint_warning_as_one_line(test_registry, tmp_path, capsys):
    from napari_mias_sam.core.paths import sample_data_dir

    bad = _state_dict_file(tmp_path / "notes.pth")
    rc = main(["build-bank", str(sample_data_dir() / "normal_01.nii.gz"), "--out", str(tmp_path / "bank"),
               "--backbone", "sam-vit_b", "--checkpoint", str(bad), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert any(line.startswith("mias-sam build-bank: warning: notes.pth: not a known vit_b checkpoint") for line in err), err
    assert err[-1].startswith("mias-sam build-bank: error: ") and "does not match the SAM vit_b architecture" in err[-1]
    assert not (tmp_path / "bank").exists()

