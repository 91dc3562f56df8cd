"""The CLI: fast help, each subcommand, and one clear line + exit 2 for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difftrain.cli import main

REPO = Path(__file__).resolve().parents[2]
SUBCOMMANDS = [
    "train",
    "validate-config",
    "make-dummy-data",
    "make-tiny-model",
    "sample",
    "env",
    "quickstart",
]


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from difftrain.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"for cmd in {SUBCOMMANDS!r}:\n"
        "    try:\n        main([cmd, '--help'])\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "HEAVY []" in result.stdout
    for cmd in SUBCOMMANDS:
        assert cmd in result.stdout


def test_console_script_answers_help() -> None:
    script = Path(sys.executable).parent / "difftrain"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "quickstart" in result.stdout


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def bad_inputs(tmp_path: Path, dummy_data_dir: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, text the one error line must contain)."""

    def config(name: str, text: str) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        return str(path)

    data = f"data: {{train_dir: {dummy_data_dir}, resolution: 64}}\n"
    no_caption = tmp_path / "no_caption"
    no_caption.mkdir()
    (no_caption / "x.png").write_bytes((dummy_data_dir / "00000.png").read_bytes())
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "x.png").write_bytes(b"garbage")
    (corrupt / "x.txt").write_text("a caption")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    whole = (dummy_data_dir / "00000.png").read_bytes()
    (truncated / "x.png").write_bytes(whole[: len(whole) // 2])
    (truncated / "x.txt").write_text("a caption")
    other_run = tmp_path / "other_run"
    other_run.mkdir()
    (other_run / "config.yaml").write_text("train: {seed: 12345}\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = ["--output-dir", str(tmp_path / "out")]
    return {
        "missing config": (
            ["train", "--config", str(tmp_path / "nope.yaml"), *out],
            "does not exist",
        ),
        "invalid yaml": (
            ["train", "--config", config("bad", "data: [1, 2\n"), *out],
            "line 2: invalid YAML",
        ),
        "unknown key": (
            ["train", "--config", config("k", data + "train: {max_step: 1}\n"), *out],
            "train.max_step: unknown key; did you mean 'train.max_steps'?",
        ),
        "wrong type": (
            ["train", "--config", config("t", data), "--set", "train.batch_size=two", *out],
            "train.batch_size: must be an integer",
        ),
        "resolution": (
            ["validate-config", "--config", config("r", data), "--set", "data.resolution=60"],
            "data.resolution: must be a positive multiple of 8",
        ),
        "missing data folder": (
            ["train", "--config", config("d", f"data: {{train_dir: {tmp_path / 'gone'}}}\n"), *out],
            "data.train_dir: folder",
        ),
        "no images": (
            ["train", "--config", config("e", f"data: {{train_dir: {empty}}}\n"), *out],
            "no images in",
        ),
        "no caption": (
            ["train", "--config", config("c", f"data: {{train_dir: {no_caption}}}\n"), *out],
            "has no caption file x.txt",
        ),
        "corrupt image": (
            [
                "train",
                "--config",
                config("i", f"data: {{train_dir: {corrupt}, resolution: 64}}\n"),
                *out,
            ],
            "cannot read image",
        ),
        "truncated image": (
            [
                "train",
                "--config",
                config("ti", f"data: {{train_dir: {truncated}, resolution: 64}}\n"),
                *out,
            ],
            "cannot read image",
        ),
        "output dir holds a different run": (
            ["train", "--config", config("o", data), "--output-dir", str(other_run)],
            "holds a different run",
        ),
        "resume from a non-checkpoint": (
            [
                "train",
                "--config",
                config("nc", data),
                *out,
                "--resume-from-checkpoint",
                str(dummy_data_dir),
            ],
            "is not a complete checkpoint",
        ),
        "tiny model into a full folder": (
            ["make-tiny-model", "--output-dir", str(dummy_data_dir)],
            "is not empty; choose a new or empty folder",
        ),
        "unknown lora target": (
            [
                "train",
                "--config",
                config("lt", data + "lora: {enabled: true, target_modules: [to_qq]}\n"),
                *out,
            ],
            "lora.target_modules: ['to_qq'] do not name UNet modules",
        ),
        "validation timestep out of range": (
            [
                "train",
                "--config",
                config(
                    "vt",
                    data
                    + f"validation: {{loss_every_steps: 1, loss_dir: {dummy_data_dir}, loss_timesteps: [1000]}}\n",
                ),
                *out,
            ],
            "validation.loss_timesteps: [1000] must be below 1000",
        ),
        "missing model": (
            ["train", "--config", config("m", data + "model: {pretrained: ./no/model}\n"), *out],
            "model.pretrained: folder ./no/model does not exist",
        ),
        "bad --set": (
            ["train", "--config", config("s", data), "--set", "oops", *out],
            "expected section.key=value",
        ),
        "dummy data into a full folder": (
            ["make-dummy-data", "--output-dir", str(dummy_data_dir.parent), "--num-images", "1"],
            "not empty",
        ),
    }


CASES = [
    "missing config",
    "invalid yaml",
    "unknown key",
    "wrong type",
    "resolution",
    "missing data folder",
    "no images",
    "no caption",
    "corrupt image",
    "truncated image",
    "output dir holds a different run",
    "resume from a non-checkpoint",
    "tiny model into a full folder",
    "unknown lora target",
    "validation timestep out of range",
    "missing model",
    "bad --set",
    "dummy data into a full folder",
]


# These need the model to check (its module names, its scheduler), so the run has already
# written config.yaml and env.json into its new folder; nothing that was there is touched.
FOUND_ONCE_THE_MODEL_IS_LOADED = {"unknown lora target", "validation timestep out of range"}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(
    case: str, bad_inputs, capsys, tmp_path: Path, tiny_model_dir
) -> None:
    argv, expected = bad_inputs[case]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("difftrain: error: ")
    assert expected in lines[0]
    assert "Traceback" not in err
    if case not in FOUND_ONCE_THE_MODEL_IS_LOADED:
        assert not (tmp_path / "out" / "config.yaml").exists()  # nothing written for bad input
    assert (tmp_path / "other_run" / "config.yaml").read_text() == "train: {seed: 12345}\n"


def test_exit_code_2_from_a_real_process(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "difftrain", "train", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_refused_output_dir_keeps_what_is_there(
    tmp_path: Path, capsys, dummy_data_dir: Path
) -> None:
    out = tmp_path / "someone-elses"
    out.mkdir()
    (out / "model_index.json").write_text("{}")
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train_dir: {dummy_data_dir}, resolution: 64}}\n")
    code, _, err = run_cli(capsys, "train", "--config", str(config), "--output-dir", str(out))
    assert code == 2 and "holds a pipeline difftrain did not write" in err
    assert (out / "model_index.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json"]


def test_validate_config_writes_resolved_config_and_env(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("data: {train_dir: ./images, resolution: 64}\n")
    code, out, _ = run_cli(
        capsys, "validate-config", "--config", str(config), "--output-dir", "run", "--deterministic"
    )
    assert code == 0 and "config OK" in out
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"train_dir: {tmp_path / 'images'}" in resolved
    assert "deterministic: true" in resolved and "max_steps: 100" in resolved
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["determinism"]["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "torch" in env["packages"] and env["python"].count(".") == 2


def test_env_prints_json(capsys) -> None:
    code, out, _ = run_cli(capsys, "env")
    assert code == 0
    assert json.loads(out)["packages"]["difftrain"]


def test_make_tiny_model_then_sample(tmp_path: Path, capsys) -> None:
    from PIL import Image

    code, _, _ = run_cli(capsys, "make-tiny-model", "--output-dir", str(tmp_path / "m"))
    assert code == 0 and (tmp_path / "m" / "model_index.json").is_file()
    png = tmp_path / "s.png"
    code, _, _ = run_cli(
        capsys,
        "sample",
        "--model",
        str(tmp_path / "m"),
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--output",
        str(png),
    )
    assert code == 0
    with Image.open(png) as image:
        first = image.tobytes()
        assert image.size == (64, 64)
    run_cli(
        capsys,
        "sample",
        "--model",
        str(tmp_path / "m"),
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--output",
        str(png),
    )
    with Image.open(png) as image:
        assert image.tobytes() == first  # same seed, same image


def test_train_command_end_to_end(
    tmp_path: Path, capsys, dummy_data_dir: Path, tiny_model_dir
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"data: {{train_dir: {dummy_data_dir}, resolution: 64}}\ntrain: {{max_steps: 1}}\n"
    )
    code, out, _ = run_cli(
        capsys,
        "train",
        "--config",
        str(config),
        "--output-dir",
        str(tmp_path / "o"),
        "--set",
        "checkpointing.every_steps=0",
    )
    assert code == 0 and "trained 1 steps" in out
    assert not list((tmp_path / "o").glob("checkpoint-*"))


def test_quickstart_runs_and_reruns(tmp_path: Path, capsys, tiny_model_dir) -> None:
    argv = ["quickstart", "--output-dir", str(tmp_path / "q"), "--steps", "2"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "quickstart done" in out
    assert (tmp_path / "q" / "sample.png").is_file()
    assert (tmp_path / "q" / "run" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # Library progress bars stay off the terminal: only difftrain's own lines.
    assert "Loading pipeline components" not in err and "Writing model shards" not in err
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0  # re-running replaces its own run


def test_non_finite_loss_exits_1_with_one_line(
    tmp_path: Path, capsys, dummy_data_dir: Path, tiny_model_dir, monkeypatch
) -> None:
    from difftrain.training import trainer

    monkeypatch.setattr(
        trainer, "diffusion_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True)
    )
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train_dir: {dummy_data_dir}, resolution: 64}}\n")
    code, _, err = run_cli(
        capsys, "train", "--config", str(config), "--output-dir", str(tmp_path / "o")
    )
    assert code == 1
    # The run's own progress lines come first; the failure is the one last line.
    last = err.strip().splitlines()[-1]
    assert last.startswith("difftrain: training stopped: non-finite loss (nan) at step 1")
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "unet").exists()
