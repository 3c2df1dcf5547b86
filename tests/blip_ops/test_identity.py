"""Checkpoint identity is content: copies match, re-trained weights do not, the digest is cached per node."""

from __future__ import annotations

import os
import shutil

from blip_ops import identity


def test_a_copy_has_the_same_identity_and_retrained_weights_another(tiny_itm, tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_MODERATE_IDENTITY_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_itm, copy)
    assert identity.checkpoint_identity(str(copy)) == identity.checkpoint_identity(tiny_itm)
    (copy / ".hidden-record").write_text("not content")  # e.g. the model cache's source record
    assert identity.checkpoint_identity(str(copy)) == identity.checkpoint_identity(tiny_itm)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert identity.checkpoint_identity(str(copy)) != identity.checkpoint_identity(tiny_itm)


def test_the_digest_is_cached_by_path_size_and_mtime(tiny_itm, tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_MODERATE_IDENTITY_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_itm, copy)
    first = identity.cached_directory_digest(copy)
    calls = []
    monkeypatch.setattr(identity, "directory_digest", lambda d: calls.append(d) or "recomputed")
    assert identity.cached_directory_digest(copy) == first and not calls  # cached
    config = copy / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    assert identity.cached_directory_digest(copy) == "recomputed" and calls  # a touched file is hashed again


def test_a_hub_model_is_its_commit(monkeypatch, tmp_path):
    snapshot = tmp_path / "models--org--m" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename: str(snapshot / filename))
    assert identity.checkpoint_identity("org/m") == "hub:org/m@0123abcd"
    assert identity.checkpoint_identity(None) is None
