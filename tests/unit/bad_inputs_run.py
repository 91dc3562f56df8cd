"""Bad-input cases for configs, output folders, checkpoints and the other commands."""

from __future__ import annotations

from pathlib import Path

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


def _two_optimizers(ws: Workspace) -> Case:
    config = ws.data_config("o", "train: {optimizer: prodigy, use_8bit_adam: true}\n")
    return Case(
        ["train", "--config", config, *ws.out],
        "train.use_8bit_adam: true asks for adamw_8bit but train.optimizer is prodigy",
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
    (other / ".difftrain-run.json").write_text('{"difftrain": "0.1.0"}\n')
    (other / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
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
        "lora.target_modules: ['to_qq'] do not name modules of the UNet2DConditionModel",
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


def _not_a_run(ws: Workspace) -> Case:
    # What used to be deleted from any folder: samples/, checkpoint-*, metrics.jsonl, .*.old
    other = ws.folder("my_project")
    for name in ("samples/cat.png", "checkpoint-1/notes.txt", "metrics.jsonl", ".cache.old"):
        (other / name).parent.mkdir(parents=True, exist_ok=True)
        (other / name).write_text("mine")
    return Case(["train", "--config", ws.data_config("nr"), "--output-dir", str(other)],
                "is not empty and holds no difftrain run")  # fmt: skip


def _photos_in_samples(ws: Workspace) -> tuple:
    photos = ws.folder("photos")
    (photos / "samples").mkdir()
    (photos / "samples" / "a.png").write_bytes((ws.data / "00000.png").read_bytes())
    (photos / "samples" / "a.txt").write_text("a red circle")
    return photos, ws.data_config("ph", data_dir=photos)


def _output_is_the_data(overwrite: bool):
    def build(ws: Workspace) -> Case:
        photos, config = _photos_in_samples(ws)
        flags = ["--overwrite"] if overwrite else []
        return Case(["train", "--config", config, "--output-dir", str(photos), *flags],
                    f"--output-dir {photos} is data.train_dir")  # fmt: skip

    return build


def _output_contains_the_data(ws: Workspace) -> Case:
    return Case(
        ["train", "--config", ws.data_config("cd"), "--output-dir", str(ws.root), "--overwrite"],
        f"--output-dir {ws.root} contains data.train_dir",
    )


def _output_is_the_model(ws: Workspace) -> Case:
    config = ws.data_config("om", f"model: {{pretrained: '{ws.model}'}}\n")
    return Case(["train", "--config", config, "--output-dir", str(ws.model), "--overwrite"],
                "is model.pretrained")  # fmt: skip


def _empty_output_dir(ws: Workspace) -> Case:
    return Case(["train", "--config", ws.data_config("eo"), "--output-dir", ""],
                "train.output_dir: must name a folder", cwd=ws.root)  # fmt: skip


def _output_parent_is_a_file(ws: Workspace) -> Case:
    (ws.root / "afile").write_text("x")
    return Case(
        ["train", "--config", ws.data_config("pf"), "--output-dir", str(ws.root / "afile" / "o")],
        "cannot create it",
    )


def _output_not_writable(ws: Workspace) -> Case:
    # As root, permissions do not stop a write: make the lock file's open fail as it would.
    from difftrain.training import output_lock

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    return Case(["train", "--config", ws.data_config("nw"), *ws.out],
                "cannot write there (Permission denied)", may_create=("out",),
                patch=lambda mp: mp.setattr(output_lock, "open", refuse, raising=False))  # fmt: skip


def _output_in_use(ws: Workspace) -> Case:
    from difftrain.training.output_lock import OutputLock

    busy = ws.folder("busy")
    holder = OutputLock(busy).acquire()  # released when the case (and so `holder`) goes
    case = Case(["train", "--config", ws.data_config("iu"), "--output-dir", str(busy)],
                f"--output-dir {busy} is in use by process")  # fmt: skip
    case.keep_alive = holder
    return case


def _broken_run(ws: Workspace) -> Path:
    run = ws.folder("broken_run")
    (run / ".difftrain-run.json").write_text('{"difftrain": "0.2.0"}\n')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (run / "checkpoint-4").mkdir()
    (run / "checkpoint-4" / "optimizer.pt").write_bytes(b"state")
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "manifest.json").write_text("{not json")
    return run


def _latest_with_no_intact_checkpoint(ws: Workspace) -> Case:
    run = _broken_run(ws)
    return Case(
        ["train", "--config", ws.data_config("li"), "--output-dir", str(run),
         "--resume-from-checkpoint", "latest"],
        f"no checkpoint in {run} passes verification (checkpoint-4: no manifest.json; "
        "checkpoint-2: manifest.json is unreadable)",
    )  # fmt: skip


def _resume_past_max_steps(ws: Workspace) -> Case:
    from difftrain.config import dump_config, resolve_run_config
    from difftrain.training.checkpoint import write_manifest

    config = ws.data_config("pm", "train: {max_steps: 2}\n")
    run = ws.folder("long_run")
    checkpoint = run / "checkpoint-4"
    checkpoint.mkdir()
    dump_config(resolve_run_config(config, output_dir=str(run)), checkpoint / "config.yaml")
    (checkpoint / "training_state.json").write_text('{"format_version": 2}\n')
    (checkpoint / "optimizer.pt").write_bytes(b"state")
    write_manifest(checkpoint, 4)
    return Case(
        ["train", "--config", config, "--output-dir", str(run),
         "--resume-from-checkpoint", str(checkpoint)],
        "train.max_steps is 2 but checkpoint-4 is at step 4",
    )  # fmt: skip


def _output_in_the_model_cache(ws: Workspace) -> Case:
    # builtin:tiny lives in DIFFTRAIN_CACHE: writing there would change every later run's base.
    return Case(["train", "--config", ws.data_config("mc"), "--output-dir", str(ws.model),
                 "--overwrite"], "is inside the model cache (DIFFTRAIN_CACHE)")  # fmt: skip


def _run_with_checkpoints(ws: Workspace, config: str, name: str) -> Path:
    """A run folder with two checkpoints whose manifests verify but whose files are junk."""
    from difftrain.config import dump_config, resolve_run_config
    from difftrain.training.checkpoint import write_manifest

    run = ws.folder(name)
    (run / ".difftrain-run.json").write_text('{"difftrain": "0.2.0"}\n')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    for step in (1, 2):
        checkpoint = run / f"checkpoint-{step}"
        checkpoint.mkdir()
        dump_config(resolve_run_config(config, output_dir=str(run)), checkpoint / "config.yaml")
        (checkpoint / "training_state.json").write_text('{"format_version": 2}\n')
        (checkpoint / "optimizer.pt").write_bytes(b"garbage")
        write_manifest(checkpoint, step)
    return run


def _refused_resume_deletes_nothing(ws: Workspace) -> Case:
    # It used to truncate metrics.jsonl and delete checkpoint-2 before finding checkpoint-1 bad.
    config = ws.data_config("rr")
    run = _run_with_checkpoints(ws, config, "refused_resume")
    return Case(["train", "--config", config, "--output-dir", str(run),
                 "--resume-from-checkpoint", str(run / "checkpoint-1")],
                "cannot resume from", may_create=("refused_resume",))  # fmt: skip


def _tampered_manifest(entry: str, expected: str):
    def build(ws: Workspace) -> Case:
        import json

        config = ws.data_config("tm")
        run = _run_with_checkpoints(ws, config, "tampered")
        for step in (1, 2):
            manifest_path = run / f"checkpoint-{step}" / "manifest.json"
            manifest = json.loads(manifest_path.read_text())
            if entry:
                manifest["files"][entry] = {"bytes": 1, "sha256": "0" * 64}
            else:
                manifest["files"] = {}
            manifest_path.write_text(json.dumps(manifest))
        return Case(["train", "--config", config, "--output-dir", str(run),
                     "--resume-from-checkpoint", "latest"], expected)  # fmt: skip

    return build


def _checkpoint_config_not_a_mapping(ws: Workspace) -> Case:
    from difftrain.training.checkpoint import write_manifest

    config = ws.data_config("cl")
    run = _run_with_checkpoints(ws, config, "odd_config")
    (run / "checkpoint-2" / "config.yaml").write_text("- just\n- a list\n")
    write_manifest(run / "checkpoint-2", 2)
    return Case(["train", "--config", config, "--output-dir", str(run),
                 "--resume-from-checkpoint", "latest"],
                "config.yaml is not a config difftrain wrote")  # fmt: skip


def _linked_checkpoint(ws: Workspace) -> Case:
    config = ws.data_config("lc")
    run = _run_with_checkpoints(ws, config, "linked")
    (run / "checkpoint-2").rename(ws.root / "elsewhere")
    (run / "checkpoint-2").symlink_to(ws.root / "elsewhere")
    return Case(["train", "--config", config, "--output-dir", str(run), "--overwrite"],
                "checkpoint-2 is a symbolic link")  # fmt: skip


def _linked_lock(ws: Workspace) -> Case:
    victim = ws.root / "victim.txt"
    victim.write_text("precious")
    out = ws.folder("locked")
    (out / ".difftrain.lock").symlink_to(victim)
    return Case(["validate-config", "--config", ws.data_config("ll"), "--output-dir", str(out)],
                ".difftrain.lock is a symbolic link")  # fmt: skip


CASES = {
    "config: two optimizers": _two_optimizers,
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
    "resume: latest, but no checkpoint verifies": _latest_with_no_intact_checkpoint,
    "resume: max_steps below the checkpoint's step": _resume_past_max_steps,
    "output: a non-empty folder that is no run": _not_a_run,
    "output: is the data folder": _output_is_the_data(overwrite=False),
    "output: is the data folder, with --overwrite": _output_is_the_data(overwrite=True),
    "output: contains the data folder": _output_contains_the_data,
    "output: is the base model": _output_is_the_model,
    "output: empty --output-dir": _empty_output_dir,
    "output: parent is a file": _output_parent_is_a_file,
    "output: not writable": _output_not_writable,
    "output: in use by another run": _output_in_use,
    "output: the model cache, with --overwrite": _output_in_the_model_cache,
    "output: a checkpoint-N that is a link": _linked_checkpoint,
    "output: the lock file is a link": _linked_lock,
    "resume: a refused resume deletes nothing": _refused_resume_deletes_nothing,
    "resume: a manifest naming a file outside": _tampered_manifest(
        "../../../../etc/passwd", "manifest.json names a file outside the checkpoint"
    ),
    "resume: a manifest that lists nothing": _tampered_manifest(
        "", "manifest.json does not list config.yaml"
    ),
    "resume: the checkpoint's config.yaml is a list": _checkpoint_config_not_a_mapping,
    "lora: unknown target module": _unknown_lora_target,
    "validation: timestep out of range": _validation_timestep,
    "make-dummy-data: into a full folder": _dummy_data_into_full_folder,
}
