"""Model versions: `ml_service.hosting.list_versions` and `resolve_version` on their own.

A version is a subdirectory of `models_dir` that holds a checkpoint (`config.json`); the default is
the last by name. What the errors say reaches clients (the admin answers, /ready): names and
versions only, never a server path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ml_service.hosting import VersionNotFound, list_versions, resolve_version
from ml_service.settings import Settings


@pytest.fixture(autouse=True)
def no_service_environment(monkeypatch):
    """Settings read ML_SERVICE_* variables: none from the caller's shell may leak in."""
    for name in list(os.environ):
        if name.startswith("ML_SERVICE_"):
            monkeypatch.delenv(name)


def make_versions(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
    return root


def settings_for(tmp_path: Path, **changes) -> Settings:
    return Settings(checkpoint=tmp_path / "default-checkpoint", **changes)


# -- list_versions --------------------------------------------------------------------------------
def test_versions_are_the_checkpoint_subdirectories_sorted_by_name(tmp_path):
    make_versions(tmp_path, "v3", "v1", "v2")
    (tmp_path / "notes").mkdir()  # no config.json: not a checkpoint
    (tmp_path / "notes" / "readme.txt").write_text("x")
    (tmp_path / "config.json").write_text("{}")  # a file, not a version
    (tmp_path / "v4.json").write_text("{}")
    (tmp_path / "v5").mkdir()
    (tmp_path / "v5" / "config.json").mkdir()  # not a file either
    assert list_versions(tmp_path) == ["v1", "v2", "v3"]


def test_dated_versions_sort_in_time_order(tmp_path):
    make_versions(tmp_path, "2025-01-09", "2024-12-31", "2025-01-10")
    assert list_versions(tmp_path) == ["2024-12-31", "2025-01-09", "2025-01-10"]


def test_an_empty_models_dir_has_no_versions(tmp_path):
    assert list_versions(tmp_path) == []


def test_listing_a_missing_models_dir_is_version_not_found_without_its_path(tmp_path):
    missing = tmp_path / "secret-location" / "models"
    with pytest.raises(VersionNotFound) as e:
        list_versions(missing)
    assert str(e.value) == "the models directory does not exist"
    assert str(tmp_path) not in str(e.value) and "secret-location" not in str(e.value)


# -- resolve_version ------------------------------------------------------------------------------
def test_the_default_version_is_the_last_by_name(tmp_path):
    models = make_versions(tmp_path / "models", "v1", "v3", "v2")
    path, name = resolve_version(settings_for(tmp_path, models_dir=models), None)
    assert (path, name) == (models / "v3", "v3")


def test_the_configured_model_version_wins_over_the_last(tmp_path):
    models = make_versions(tmp_path / "models", "v1", "v2", "v3")
    s = settings_for(tmp_path, models_dir=models, model_version="v1")
    assert resolve_version(s, None) == (models / "v1", "v1")
    # a version asked for (an admin reload) wins over the configured one
    assert resolve_version(s, "v2") == (models / "v2", "v2")


def test_an_unknown_version_lists_the_available_ones_and_no_path(tmp_path):
    models = make_versions(tmp_path / "models", "v2", "v1")
    s = settings_for(tmp_path, models_dir=models)
    with pytest.raises(VersionNotFound) as e:
        resolve_version(s, "v9")
    assert str(e.value) == "unknown version 'v9'; available: v1, v2"
    assert str(tmp_path) not in str(e.value)


def test_an_unknown_configured_version_is_version_not_found_too(tmp_path):
    models = make_versions(tmp_path / "models", "v1")
    s = settings_for(tmp_path, models_dir=models, model_version="v7")
    with pytest.raises(VersionNotFound, match=r"^unknown version 'v7'; available: v1$"):
        resolve_version(s, None)


def test_a_directory_without_a_checkpoint_is_not_a_version(tmp_path):
    models = make_versions(tmp_path / "models", "v1")
    (models / "v2").mkdir()  # being copied, or a broken one without config.json
    s = settings_for(tmp_path, models_dir=models)
    assert resolve_version(s, None) == (models / "v1", "v1")
    with pytest.raises(VersionNotFound, match="available: v1$"):
        resolve_version(s, "v2")


def test_an_empty_models_dir_is_version_not_found_without_its_path(tmp_path):
    models = tmp_path / "private" / "models"
    models.mkdir(parents=True)
    s = settings_for(tmp_path, models_dir=models)
    for version in (None, "v1"):
        with pytest.raises(VersionNotFound) as e:
            resolve_version(s, version)
        assert str(e.value) == "no checkpoints in the models directory"
        assert str(tmp_path) not in str(e.value) and "private" not in str(e.value)


def test_a_missing_models_dir_is_version_not_found_without_its_path(tmp_path):
    s = settings_for(tmp_path, models_dir=tmp_path / "private" / "gone")
    with pytest.raises(VersionNotFound) as e:
        resolve_version(s, None)
    assert str(e.value) == "the models directory does not exist"
    assert str(tmp_path) not in str(e.value) and "private" not in str(e.value)


def test_without_a_models_dir_the_checkpoint_is_served_under_its_own_name(tmp_path):
    s = settings_for(tmp_path)
    assert s.models_dir is None
    assert resolve_version(s, None) == (tmp_path / "default-checkpoint", "default-checkpoint")


def test_without_a_models_dir_asking_for_a_version_says_what_is_needed(tmp_path):
    s = settings_for(tmp_path, model_version="v1")  # ignored without a models directory
    assert resolve_version(s, None) == (tmp_path / "default-checkpoint", "default-checkpoint")
    with pytest.raises(VersionNotFound) as e:
        resolve_version(s, "v1")
    assert "ML_SERVICE_MODELS_DIR" in str(e.value) and str(tmp_path) not in str(e.value)
