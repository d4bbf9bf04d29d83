"""Base models on disk: complete and intact checkpoints only, one conversion at a time, digests cached."""

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from banklora import basemodel
from banklora.errors import UsageError


def _fake_converted(target, value: float = 1.0):
    """A small stand-in for the converted embedded checkpoint: real safetensors and a manifest."""
    target.mkdir(parents=True)
    save_file({"w": torch.full((64, 64), value)}, str(target / "model.safetensors"))
    (target / "config.json").write_text("{}")
    return basemodel.write_manifest(target, source="test")


def test_a_checkpoint_without_a_valid_manifest_is_not_used(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    assert basemodel.read_manifest(tmp_path) is None  # interrupted before the manifest
    manifest = {"weights_sha256": "ab", "files": {"model.safetensors": {"size": 10, "sha256": "cd"}}}
    (tmp_path / basemodel.MANIFEST).write_text(json.dumps(manifest))
    assert basemodel.read_manifest(tmp_path) == manifest
    (tmp_path / "model.safetensors").write_bytes(b"x" * 5)  # truncated afterwards
    assert basemodel.read_manifest(tmp_path) is None


def test_two_first_runs_convert_once(tmp_path, monkeypatch):
    """The lock serialises first runs; the second finds the first's result. The 2-minute
    conversion itself is replaced by a stand-in that writes a complete checkpoint slowly."""
    monkeypatch.setenv(basemodel.CACHE_ENV, str(tmp_path))
    calls = []

    def slow_convert(target):
        calls.append(target)
        time.sleep(0.5)
        _fake_converted(target)

    monkeypatch.setattr(basemodel, "_convert", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(basemodel.embedded_checkpoint())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / basemodel.EMBEDDED_NAME] * 2


def test_safetensors_invariants_catch_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(100)}, str(path))
    basemodel.check_safetensors(path)  # intact
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])
    with pytest.raises(UsageError, match=r"w.safetensors is damaged: .* bytes where its header describes .* \(truncated"):
        basemodel.check_safetensors(path)
    path.write_bytes(b"PK\x03\x04 a zip file, not safetensors")
    with pytest.raises(UsageError, match="w.safetensors is damaged: not a readable safetensors file"):
        basemodel.check_safetensors(path)


def test_bytes_overwritten_in_the_embedded_model_are_found_and_it_is_converted_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(basemodel.CACHE_ENV, str(tmp_path))
    target = tmp_path / basemodel.EMBEDDED_NAME
    _fake_converted(target)
    calls = []

    def convert(t):
        calls.append(t)
        shutil.rmtree(t)
        _fake_converted(t)

    monkeypatch.setattr(basemodel, "_convert", convert)
    assert basemodel.embedded_checkpoint(verify=True) == target and calls == []  # intact: used as it is
    weights = target / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as f:  # same size, valid header: only the sha256 can tell
        f.seek(stat.st_size // 2)
        f.write(b"DELL" * 8)
    # as an edit a second later would leave it (the kernel's clock may not tick within this test)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with caplog.at_level("WARNING", logger="banklora.basemodel"):
        assert basemodel.embedded_checkpoint() == target  # even without verify=True: its mtime moved, so it is hashed again
    assert calls == [target]
    assert "is damaged (model.safetensors's sha256 differs from the one recorded at conversion); converting it again" in caplog.text
    assert basemodel.embedded_checkpoint(verify=True) == target and calls == [target]


def test_a_users_base_is_hashed_once_and_refused_when_changed_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv(basemodel.CACHE_ENV, str(tmp_path / "cache"))
    base = tmp_path / "my-gemma"
    base.mkdir()
    (base / "config.json").write_text("{}")
    save_file({"w": torch.ones(64, 64)}, str(base / "model.safetensors"))
    hashed = []
    real = basemodel.sha256_file
    monkeypatch.setattr(basemodel, "sha256_file", lambda p, *a: hashed.append(p) or real(p, *a))
    first = basemodel.resolve(str(base))
    again = basemodel.resolve(str(base))
    assert first.sha256 == again.sha256 and len(hashed) == 1  # the second load read the cached digest
    assert basemodel.resolve(str(base), verify=True).sha256 == first.sha256 and len(hashed) == 2  # verify hashes again

    weights = base / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(stat.st_size - 64)
        f.write(b"\x7f" * 16)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: a stat check cannot see it
    assert basemodel.resolve(str(base)).sha256 == first.sha256  # the cheap path trusts the cache...
    with pytest.raises(UsageError, match=r"model.safetensors is damaged: its sha256 changed while its size and modification time did not"):
        basemodel.resolve(str(base), verify=True)  # ...the verifying commands do not


def test_the_portable_name_of_a_base(tmp_path):
    snapshot = tmp_path / "hub" / "models--google--gemma-3-1b-pt" / "snapshots" / "abc123"
    assert basemodel._portable_name(str(snapshot), snapshot) == "google/gemma-3-1b-pt"
    assert basemodel._portable_name(str(tmp_path / "mine"), tmp_path / "mine") == str(tmp_path / "mine")


def test_the_converted_embedded_checkpoint_is_complete(embedded_dir):
    manifest = basemodel.read_manifest(embedded_dir)
    assert manifest is not None and "model.safetensors" in manifest["files"]
    config = json.loads((embedded_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18
    assert "quantization_config" not in config  # a plain float32 checkpoint, not a GGUF view
    assert basemodel.resolve("gemma-3-270m", verify=True).sha256 == manifest["weights_sha256"]


def test_a_conversion_parses_the_gguf_once(tmp_path, monkeypatch):
    """transformers parses a GGUF file again in each load (the tokenizer, the config, the weights:
    17 s each for the embedded model's 262,144-token vocabulary); within banklora's conversion the
    loads share one parse and read the same metadata, and afterwards gguf's reader is its own again."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_head_count(1)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parsed = []

    class Counting(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(path)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    alone = [load_gguf_checkpoint(path)["config"] for _ in range(2)]
    assert len(parsed) == 2
    parsed.clear()
    with basemodel._gguf_parsed_once():
        shared = [load_gguf_checkpoint(path)["config"] for _ in range(2)]
    assert len(parsed) == 1
    assert shared == alone and shared[0]["num_hidden_layers"] == 2
    assert gguf.GGUFReader is Counting
