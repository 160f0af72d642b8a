import json

import pytest

from visionloop.core.manifest import Artifact, ManifestError, ModelManifest, Preprocessing
from visionloop.core.model_store import ModelStore, StoreError, validate_name


def make_manifest(version: str = "v1", **changes) -> ModelManifest:
    values = dict(
        name="fm", version=version, arch="efficientnet_lite0", classes=("a", "b"),
        preprocessing=Preprocessing(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), temperature=1.5,
        artifacts={"onnx": Artifact("model.onnx", "onnx", "ab" * 32, 1e-6)},
        metrics={"test": {"macro_f1": 0.9}}, created_at="2026-01-01T00:00:00+00:00")
    values.update(changes)
    return ModelManifest(**values)


def test_manifest_round_trip(tmp_path):
    manifest = make_manifest()
    manifest.save(tmp_path)
    loaded = ModelManifest.load(tmp_path)
    assert loaded == manifest
    assert loaded.preprocessing.mean == (0.5, 0.5, 0.5)
    assert loaded.artifact_path(tmp_path, "onnx") == tmp_path / "model.onnx"
    assert not list(tmp_path.glob(".*tmp")), "atomic write left a temp file behind"


@pytest.mark.parametrize("changes, message", [
    ({"classes": ()}, "at least one class"),
    ({"classes": ("a", "a")}, "duplicate class"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"classes": ("cat", "../../etc")}, "plain folder names"),
    ({"classes": ("cat", "..")}, "plain folder names"),
    ({"artifacts": {"x": Artifact("../../w.pt", "torchscript", "00")}}, "must be a file name"),
    ({"artifacts": {"x": Artifact("m.bin", "pickle", "00")}}, "format 'pickle'"),
])
def test_manifest_rejects_bad_values(changes, message):
    with pytest.raises(ManifestError, match=message):
        make_manifest(**changes)


def test_preprocessing_rejects_crop_larger_than_resize():
    with pytest.raises(ManifestError, match="image_size <= resize"):
        Preprocessing(64, 32, (0.5,) * 3, (0.5,) * 3)


def test_manifest_load_errors_name_the_file(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        ModelManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        ModelManifest.load(tmp_path)
    data = make_manifest().to_dict()
    del data["classes"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="classes"):
        ModelManifest.load(tmp_path)
    data = make_manifest().to_dict() | {"schema_version": 99}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema_version"):
        ModelManifest.load(tmp_path)


def test_store_versions_publish_and_never_overwrite(tmp_path):
    store = ModelStore(tmp_path)
    assert store.versions("fm") == [] and store.next_version("fm") == "v1"
    for _ in range(11):
        staging = store.new_staging_dir("fm")
        version = store.next_version("fm")
        make_manifest(version).save(staging)
        store.publish("fm", staging, version)
    assert store.versions("fm")[-2:] == ["v10", "v11"]  # numeric, not lexical, order
    assert store.latest_version("fm") == "v11"
    assert store.load_manifest("fm", "v3").version == "v3"
    staging = store.new_staging_dir("fm")
    with pytest.raises(StoreError, match="never overwritten"):
        store.publish("fm", staging, "v2")
    with pytest.raises(StoreError, match="has no version"):
        store.load_manifest("fm", "v99")


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 65])
def test_store_refuses_unsafe_names(name):
    with pytest.raises(StoreError, match="invalid"):
        validate_name(name)


@pytest.mark.parametrize("version", ["1", "v", "v1/../../x", "latest"])
def test_store_refuses_bad_versions(tmp_path, version):
    with pytest.raises(StoreError, match="invalid"):
        ModelStore(tmp_path).version_dir("fm", version)


def test_resolve_version_latest_or_named(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError, match="has no versions"):
        store.resolve_version("fm", "latest")
    for version in ("v1", "v2"):
        staging = store.new_staging_dir("fm")
        make_manifest(version).save(staging)
        store.publish("fm", staging, version)
    assert store.resolve_version("fm", "latest") == "v2"
    assert store.resolve_version("fm", "v1") == "v1"
    with pytest.raises(StoreError, match="invalid"):
        store.resolve_version("fm", "../v1")
