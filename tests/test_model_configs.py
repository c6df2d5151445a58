"""model= as a config.json, a folder holding one, or a Hub id: a model of the user's own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import VramProject
from pytest_vram import SpecError, StepSpec, measure, model_configs, zoo
from pytest_vram.result import MemoryResult


def tiny_config(**changes: Any) -> dict[str, Any]:
    return {"model_type": "llama", **zoo.MODELS["tiny-llama"].config, **changes}


def folder(parent: Path, name: str, **changes: Any) -> Path:
    path = parent / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(tiny_config(**changes), indent=2))
    return path


def test_a_folder_is_keyed_by_its_name_and_content(tmp_path: Path) -> None:
    spec = StepSpec(model=str(folder(tmp_path, "our-llama")), batch=1, seq=16)
    name, digest = spec.model.split("@")
    assert name == "our-llama" and len(digest) == 8
    assert spec.label.startswith(f"our-llama@{digest} full adamw")
    assert json.loads(spec.model_config)["hidden_size"] == 256
    # The same content elsewhere, written differently, is the same model.
    other = tmp_path / "copy" / "our-llama"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps(tiny_config(transformers_version="4.0")))
    assert StepSpec(model=str(other / "config.json"), batch=1, seq=16).model == spec.model


def test_two_configs_never_share_a_key(tmp_path: Path) -> None:
    a = StepSpec(model=str(folder(tmp_path / "a", "m")))
    b = StepSpec(model=str(folder(tmp_path / "b", "m", num_hidden_layers=2)))
    assert a.model != b.model and a.model.startswith("m@") and b.model.startswith("m@")


def test_a_json_file_is_named_by_its_stem(tmp_path: Path) -> None:
    path = tmp_path / "mistral-ish.json"
    path.write_text(json.dumps(tiny_config()))
    assert StepSpec(model=str(path)).model.startswith("mistral-ish@")


def test_measures_as_the_zoo_model_it_copies_on_host_and_fake(tmp_path: Path) -> None:
    spec = StepSpec(model=str(folder(tmp_path, "copy")), batch=1, seq=16)
    zoo_spec = StepSpec(model="tiny-llama", batch=1, seq=16)
    for meter in ("host", "fake"):
        ours, theirs = measure(spec, meter), measure(zoo_spec, meter)
        assert ours.peak_bytes == theirs.peak_bytes > 0
        assert ours.breakdown == theirs.breakdown
        assert ours.label.startswith(spec.model)


def test_the_spec_carries_the_config_through_json_and_baselines(tmp_path: Path) -> None:
    spec = StepSpec(model=str(folder(tmp_path, "carried", num_hidden_layers=3)))
    data = json.loads(spec.to_json())
    assert data["model"] == spec.model and data["model_config"] == spec.model_config
    # A fresh process knows nothing of the file: the spec alone re-enters the shape.
    (tmp_path / "carried" / "config.json").unlink()
    assert StepSpec.from_json(spec.to_json()) == spec
    result = MemoryResult(
        label=spec.label,
        meter="host",
        device="host-cpu",
        peak_bytes=1,
        step_peak_bytes=(1,),
        breakdown=measure(StepSpec(model="tiny-llama", seq=8), "fake").breakdown,
        spec=spec,
    )
    assert MemoryResult.from_json(result.to_json()).spec == spec


def test_zoo_specs_keep_their_baseline_form() -> None:
    assert "model_config" not in StepSpec(model="tiny-llama").to_dict()


def test_a_hand_edited_config_is_refused_naming_the_key(tmp_path: Path) -> None:
    spec = StepSpec(model=str(folder(tmp_path, "edited")))
    data = spec.to_dict()
    data["model_config"] = data["model_config"].replace('"hidden_size":256', '"hidden_size":512')
    with pytest.raises(SpecError, match=rf"model_config does not match model='{spec.model}'"):
        StepSpec.from_dict(data)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (
            None,
            r"unknown model '.*nothing-here'; known: .*; or a config.json, a folder holding one",
        ),
        ("empty-folder", r"the folder holds no config.json"),
        ("{not json", r"not a readable config.json"),
        ('{"hidden_size": 8}', r"a config.json needs a string 'model_type'"),
    ],
)
def test_bad_configs_name_the_value(tmp_path: Path, write: str | None, message: str) -> None:
    target = tmp_path / "nothing-here"
    if write == "empty-folder":
        target.mkdir()
    elif write is not None:
        target = tmp_path / "bad.json"
        target.write_text(write)
    with pytest.raises(SpecError, match=message):
        StepSpec(model=str(target))


def test_a_config_asking_for_remote_code_is_refused_naming_auto_map(tmp_path: Path) -> None:
    auto_map = {"AutoModelForCausalLM": "modeling_ours.OurForCausalLM"}
    path = folder(tmp_path, "ours", auto_map=auto_map)
    with pytest.raises(SpecError) as info:
        StepSpec(model=str(path))
    assert str(info.value) == (
        f"model {str(path)!r}: its config.json asks for remote code (auto_map: "
        "AutoModelForCausalLM), which pytest-vram never runs: remove auto_map to measure the "
        "stock 'llama' architecture of transformers"
    )
    # the same file without it is the stock architecture
    (path / "config.json").write_text(json.dumps(tiny_config()))
    assert StepSpec(model=str(path)).model.startswith("ours@")


def test_a_model_type_transformers_lacks_fails_where_the_model_is_built(tmp_path: Path) -> None:
    spec = StepSpec(model=str(folder(tmp_path, "odd", model_type="no-such-arch")), seq=8)
    with pytest.raises(SpecError, match=r"model 'odd@[0-9a-f]{8}': .*no-such-arch"):
        measure(spec, "host")


def test_a_hub_id_not_in_the_cache_is_refused_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(
        SpecError, match=r"model 'no-owner-here/no-model-here': not a file or folder"
    ):
        StepSpec(model="no-owner-here/no-model-here")


def test_keys_are_checked() -> None:
    assert model_configs.is_key("our-llama@0123abcd")
    assert not model_configs.is_key("tiny-llama")
    with pytest.raises(SpecError, match=r"unknown model 'ghost@0123abcd'"):
        StepSpec(model="ghost@0123abcd")


MARKED = """
import pytest


@pytest.mark.vram_budget(gb=1, model="configs/our-llama", batch=1, seq=16)
def test_ours(vram):
    vram.step()
"""


def test_a_marker_takes_a_config_folder_and_records_it(vram_project: VramProject) -> None:
    folder(vram_project.path / "configs", "our-llama")
    vram_project.write(MARKED)
    vram_project.record()
    (label,) = vram_project.baseline()["entries"]["test_ours"]
    assert label.startswith("our-llama@") and "configs" not in label
    entry = vram_project.entry("test_ours", label)
    assert json.loads(entry["spec"]["model_config"])["num_hidden_layers"] == 4
    vram_project.run().assert_outcomes(passed=1)
