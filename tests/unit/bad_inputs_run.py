"""Bad-input cases for configs, output folders, checkpoints and the other commands."""

from __future__ import annotations

from bad_input_table import Case, Workspace


def _missing_config(ws: Workspace) -> Case:
    return Case(["train", "--config", str(ws.root / "nope.yaml"), *ws.out], "does not exist")


def _invalid_yaml(ws: Workspace) -> Case:
    return Case(
        ["train", "--config", ws.config("bad", "data: [1, 2\n"), *ws.out], "line 2: invalid YAML"
    )


def _unknown_key(ws: Workspace) -> Case:
    config = ws.data_config("k", "train: {max_step: 1}\n")
    return Case(
        ["train", "--config", config, *ws.out],
        "train.max_step: unknown key; did you mean 'train.max_steps'?",
    )


def _wrong_type(ws: Workspace) -> Case:
    return Case(
        ["train", "--config", ws.data_config("t"), "--set", "train.batch_size=two", *ws.out],
        "train.batch_size: must be an integer",
    )


def _resolution(ws: Workspace) -> Case:
    return Case(
        ["validate-config", "--config", ws.data_config("r"), "--set", "data.resolution=60"],
        "data.resolution: must be a positive multiple of 8",
    )


def _bad_set(ws: Workspace) -> Case:
    return Case(
        ["train", "--config", ws.data_config("s"), "--set", "oops", *ws.out],
        "expected section.key=value",
    )


def _other_run(ws: Workspace) -> Case:
    other = ws.folder("other_run")
    (other / "config.yaml").write_text("train: {seed: 12345}\n")
    return Case(
        ["train", "--config", ws.data_config("o"), "--output-dir", str(other)],
        "holds a different run",
    )


def _foreign_pipeline(ws: Workspace) -> Case:
    other = ws.folder("someone-elses")
    (other / "model_index.json").write_text("{}")
    return Case(
        ["train", "--config", ws.data_config("fp"), "--output-dir", str(other)],
        "holds a pipeline difftrain did not write",
    )


def _non_checkpoint(ws: Workspace) -> Case:
    return Case(
        ["train", "--config", ws.data_config("nc"), *ws.out,
         "--resume-from-checkpoint", str(ws.data)],
        "is not a complete checkpoint",
    )  # fmt: skip


def _unknown_lora_target(ws: Workspace) -> Case:
    config = ws.data_config("lt", "lora: {enabled: true, target_modules: [to_qq]}\n")
    return Case(
        ["train", "--config", config, *ws.out],
        "lora.target_modules: ['to_qq'] do not name UNet modules",
        may_create=("out",),
    )


def _validation_timestep(ws: Workspace) -> Case:
    extra = (f"validation: {{loss_every_steps: 1, loss_dir: '{ws.data}', "
             "loss_timesteps: [1000]}\n")  # fmt: skip
    return Case(
        ["train", "--config", ws.data_config("vt", extra), *ws.out],
        "validation.loss_timesteps: [1000] must be below 1000",
        may_create=("out",),
    )


def _dummy_data_into_full_folder(ws: Workspace) -> Case:
    return Case(["make-dummy-data", "--output-dir", str(ws.root), "--num-images", "1"], "not empty")


def _duplicate_section(ws: Workspace) -> Case:
    text = f"data: {{train_dir: '{ws.data}'}}\ntrain: {{max_steps: 1}}\n\ntrain: {{seed: 3}}\n"
    return Case(["train", "--config", ws.config("dup", text), *ws.out],
                "key train appears twice (lines 2 and 4)")  # fmt: skip


def _duplicate_key(ws: Workspace) -> Case:
    text = f"data:\n  train_dir: '{ws.data}'\n  resolution: 64\n  resolution: 128\n"
    return Case(["train", "--config", ws.config("dupkey", text), *ws.out],
                "key data.resolution appears twice (lines 3 and 4)")  # fmt: skip


def _nested_too_deep(ws: Workspace) -> Case:
    text = "data: " + "[" * 20000 + "]" * 20000 + "\n"
    return Case(["train", "--config", ws.config("deep", text), *ws.out], "nested too deep")


def _infinite(key: str):
    def build(ws: Workspace) -> Case:
        return Case(
            ["train", "--config", ws.data_config("inf"), "--set", f"{key}=inf", *ws.out],
            f"{key}: must be a finite number, got",
        )

    return build


CASES = {
    "config: missing file": _missing_config,
    "config: invalid YAML": _invalid_yaml,
    "config: unknown key": _unknown_key,
    "config: wrong type": _wrong_type,
    "config: impossible resolution": _resolution,
    "config: bad --set": _bad_set,
    "config: a section twice": _duplicate_section,
    "config: a key twice": _duplicate_key,
    "config: nested too deep": _nested_too_deep,
    "config: infinite learning rate": _infinite("train.learning_rate"),
    "config: infinite adam epsilon": _infinite("train.adam_epsilon"),
    "output: holds a different run": _other_run,
    "output: holds a foreign pipeline": _foreign_pipeline,
    "resume: not a checkpoint": _non_checkpoint,
    "lora: unknown target module": _unknown_lora_target,
    "validation: timestep out of range": _validation_timestep,
    "make-dummy-data: into a full folder": _dummy_data_into_full_folder,
}
