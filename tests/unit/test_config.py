"""Config: good files load, overrides keep the key's type, every kind of error names the key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from difftrain.config import config_from_dict, config_to_dict, load_config, resolve_run_config
from difftrain.config.schema import Config
from difftrain.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"data": {"train_dir": "images"}}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["quickstart.yaml", "smoke_text2image.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data.resolution == 64
    assert cfg.data.resolution % 8 == 0


def test_smoke_config_is_what_the_runbook_expects() -> None:
    cfg = load_config(REPO / "configs" / "smoke_text2image.yaml")
    assert cfg.train.max_steps == 2
    assert cfg.model.pretrained == "hf-internal-testing/tiny-stable-diffusion-pipe"
    assert cfg.data.train_dir == "data/smoke_text2image"


def test_defaults_fill_everything_not_given() -> None:
    cfg = config_from_dict(MINIMAL)
    assert cfg.model.pretrained == "builtin:tiny"
    assert cfg.data.caption_column == "text"
    assert cfg.train.mixed_precision == "no"
    assert cfg.checkpointing.total_limit is None
    assert config_to_dict(cfg)["train"]["max_steps"] == 100


def test_resolved_config_round_trips_through_yaml() -> None:
    cfg = config_from_dict({**MINIMAL, "validation": {"prompts": ["a cat"]}})
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg


def test_overrides_take_the_type_of_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {train_dir: images}\n")
    cfg = load_config(
        path,
        [
            "train.max_steps=7",
            "train.learning_rate=1e-4",  # YAML alone would read this as a string
            "model.revision=007",  # a str key keeps exactly what was typed
            "data.random_flip=true",
            "validation.prompts=[a cat, a dog]",
            "checkpointing.total_limit=null",
            "train.mixed_precision=no",  # YAML alone would read `no` as False
        ],
    )
    assert cfg.train.mixed_precision == "no"
    assert cfg.train.max_steps == 7
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.model.revision == "007"
    assert cfg.data.random_flip is True
    assert cfg.validation.prompts == ["a cat", "a dog"]
    assert cfg.checkpointing.total_limit is None


def test_float_written_without_dot_in_yaml_file_is_a_number(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "data: {train_dir: x}\ntrain: {learning_rate: 1e-4}\n"))
    assert cfg.train.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"trian": {}}, "trian: unknown key; did you mean 'train'?"),
        (
            {"train": {"max_stepz": 3}},
            "train.max_stepz: unknown key; did you mean 'train.max_steps'?",
        ),
        (
            {"train": {"resolution": 64}},
            "train.resolution: unknown key; did you mean 'data.resolution'?",
        ),
        ({"train": {"max_steps": "ten"}}, "train.max_steps: must be an integer, got string 'ten'"),
        ({"train": {"max_steps": -1}}, "train.max_steps: must be > 0, got -1"),
        ({"train": {"max_steps": 2.5}}, "train.max_steps: must be an integer"),
        ({"train": {"deterministic": "yes please"}}, "train.deterministic: must be true or false"),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate: must be a number"),
        ({"train": {"mixed_precision": "fp61"}}, "did you mean 'fp16'?"),
        ({"data": {"resolution": 30}}, "data.resolution: must be a positive multiple of 8"),
        ({"data": {"resolution": 0}}, "data.resolution: must be a positive multiple of 8"),
        ({"data": 5}, "data: must be a mapping of keys"),
        ({"validation": {"prompts": "a cat"}}, "validation.prompts: must be a list"),
        ({"checkpointing": {"total_limit": 0}}, "checkpointing.total_limit: must be > 0"),
        ({"train": {"seed": 2**40}}, "train.seed: must be in [0, 2**32)"),
        ({"train": {"batch_size": 2**70}}, f"train.batch_size: must be at most {2**31 - 1}"),
        ({"train": {"max_steps": 2**31}}, f"train.max_steps: must be at most {2**31 - 1}, got"),
        ({"train": {"max_steps": 1e30}}, "train.max_steps: must be at most"),  # a float's int
        ({"checkpointing": {"total_limit": 2**31}}, "checkpointing.total_limit: must be at most"),
        ({"data": {"resolution": 2**64}}, "data.resolution: must be at most 8192, got"),
        (
            {"validation": {"num_inference_steps": 1001}},
            "validation.num_inference_steps: must be at most 1000, got 1001",
        ),
        (
            {"validation": {"loss_timesteps": [100, 2**40]}},
            "validation.loss_timesteps[1]: must be at most 2147483647",
        ),
        ({"validation": {"seed": -1}}, "validation.seed: must be in [0, 2**32)"),
        (
            {"validation": {"loss_timesteps": []}},
            "validation.loss_timesteps: must be a non-empty list",
        ),
        (
            {"lora": {"train_text_encoder": True}},
            "lora.train_text_encoder: is set but LoRA is off, so a full fine-tune would run and "
            "ignore it; set lora.enabled: true",
        ),
        (
            {"lora": {"rank": 16}},
            "lora.rank: is set but LoRA is off",
        ),
    ],
)
def test_bad_values_name_the_dotted_key(raw: dict, expected: str) -> None:
    merged = {**MINIMAL, **raw}
    if isinstance(raw.get("data"), dict):
        merged["data"] = {**MINIMAL["data"], **raw["data"]}
    with pytest.raises(ConfigError) as error:
        config_from_dict(merged, source="run.yaml")
    message = str(error.value)
    assert message.startswith("run.yaml: ")
    assert expected in message
    assert "\n" not in message


def test_the_largest_allowed_integers_load() -> None:
    cfg = config_from_dict(
        {
            "data": {"train_dir": "x", "resolution": 8192},
            "train": {"batch_size": 2**31 - 1, "seed": 2**32 - 1},
            "validation": {"num_inference_steps": 1000, "seed": 2**32 - 1},
        }
    )
    assert cfg.train.batch_size == 2**31 - 1 and cfg.train.seed == 2**32 - 1
    assert cfg.data.resolution == 8192 and cfg.validation.num_inference_steps == 1000


def test_missing_required_key_is_reported() -> None:
    with pytest.raises(ConfigError, match="data.train_dir: is required"):
        config_from_dict({})


def test_unknown_key_wins_over_missing_value() -> None:
    # A typo explains the "missing" key better: report the typo.
    with pytest.raises(
        ConfigError, match="data.train_dri: unknown key; did you mean 'data.train_dir'"
    ):
        config_from_dict({"data": {"train_dri": "x"}})


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  train_dir: x\ntrain:\n  max_steps: [1, 2\n  seed: 3\n")
    with pytest.raises(UserError) as error:
        load_config(path)
    assert f"{path} line " in str(error.value)
    assert "invalid YAML" in str(error.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("item", ["train.max_steps", "max_steps=3", "a.b.c=1", ".x=1"])
def test_malformed_set_is_rejected(tmp_path: Path, item: str) -> None:
    with pytest.raises(UserError, match="expected section.key=value"):
        load_config(write(tmp_path, "data: {train_dir: x}\n"), [item])


def test_set_with_unknown_key_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        load_config(write(tmp_path, "data: {train_dir: x}\n"), ["train.batchsize=2"])


def test_relative_paths_resolve_against_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = tmp_path / "repo" / "configs"
    configs.mkdir(parents=True)
    path = configs / "c.yaml"
    path.write_text("data: {train_dir: ./data/images}\ntrain: {output_dir: out}\n")
    monkeypatch.chdir(tmp_path)
    cfg = resolve_run_config(path, deterministic=True)
    assert cfg.data.train_dir == str(tmp_path / "data" / "images")
    assert cfg.train.output_dir == str(tmp_path / "out")
    assert cfg.train.deterministic is True


def test_output_dir_flag_overrides_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "data: {train_dir: x}\ntrain: {output_dir: a}\n")
    assert resolve_run_config(path, output_dir="b").train.output_dir == str(tmp_path / "b")


def test_every_schema_field_has_a_default() -> None:
    # `difftrain train` must accept a config that only names the data folder: every field of
    # every section has a default, and that default passes its own check (train_dir aside).
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        assert section.default_factory is not dataclasses.MISSING, section.name
        for item in dataclasses.fields(hints[section.name]):
            has_default = (
                item.default is not dataclasses.MISSING
                or item.default_factory is not dataclasses.MISSING
            )
            assert has_default, f"{section.name}.{item.name} has no default"
    cfg = config_from_dict({"data": {"train_dir": "x"}})
    assert cfg.train.max_steps == 100 and cfg.lora.rank == 4


def test_config_path_with_tilde_is_expanded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("data: {train_dir: x}\ntrain: {max_steps: 7}\n")
    assert load_config("~/c.yaml").train.max_steps == 7
