"""The CLI: fast help, each subcommand, and one clear line + exit 2 for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_exit_code_2_from_a_real_process(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "difftrain", "train", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


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


def test_quickstart_takes_another_family(tmp_path: Path, capsys, builtin_cache) -> None:
    argv = ["quickstart", "--output-dir", str(tmp_path / "q"), "--steps", "2"]
    code, out, _ = run_cli(capsys, *argv, "--model", "builtin:tiny-flux")
    assert code == 0 and "FluxPipeline.from_pretrained(" in out
    assert (
        tmp_path / "q" / "run" / "transformer" / "diffusion_pytorch_model.safetensors"
    ).is_file()
    assert (tmp_path / "q" / "sample.png").is_file()


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
