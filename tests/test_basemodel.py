"""The embedded model's cache: complete checkpoints only, one conversion at a time."""

import json
import threading
import time

from banklora import basemodel


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
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"w")
        files = {"model.safetensors": {"size": 1, "sha256": "0"}}
        (target / basemodel.MANIFEST).write_text(json.dumps({"weights_sha256": "0", "files": files}))

    monkeypatch.setattr(basemodel, "_convert", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(basemodel.embedded_checkpoint())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / basemodel.EMBEDDED_NAME] * 2


def test_the_converted_embedded_checkpoint_is_complete(embedded_dir):
    manifest = basemodel.read_manifest(embedded_dir)
    assert manifest is not None and "model.safetensors" in manifest["files"]
    config = json.loads((embedded_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18
    assert "quantization_config" not in config  # a plain float32 checkpoint, not a GGUF view
