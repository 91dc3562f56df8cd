"""`difftrain report`: the smoke checklist filled from a `_ci_tmp/` built here, offline.

    .venv/bin/python -m pytest tests/unit/test_report.py -v

The fake `_ci_tmp/` looks like one copied from a GPU machine: absolute paths in the JUnit
properties point to folders that do not exist here, except under `_ci_tmp/pytest_tmp/`.
One test runs pytest itself, so the parser is checked against the XML pytest really writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import stat
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

from difftrain.cli import main
from difftrain.report import MARKER

REPO = Path(__file__).resolve().parents[2]
GPU = "NVIDIA GeForce RTX 4090"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REMOTE_ROOT = "/home/runner/difftrain/_ci_tmp/pytest_tmp"  # the test machine's paths


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def case_xml(name: str, time: float, body: str = "", properties: dict | None = None) -> str:
    """One pytest-style <testcase>; properties as a dict or a list of (name, value)."""
    items = properties.items() if isinstance(properties, dict) else properties or []
    props = "".join(f"<property name={quoteattr(k)} value={quoteattr(v)} />" for k, v in items)
    props = f"<properties>{props}</properties>" if props else ""
    return (
        f'<testcase classname="tests.fake" name="{name}" time="{time:.3f}">{props}{body}</testcase>'
    )


def junit(cases: list[str], time: float, failures: int = 0, skipped: int = 0) -> str:
    return (
        '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
        f'<testsuite name="pytest" errors="0" failures="{failures}" skipped="{skipped}" '
        f'tests="{len(cases)}" time="{time}" timestamp="2026-05-01T10:00:00+00:00" '
        f'hostname="gpu-box-7">{"".join(cases)}</testsuite></testsuites>'
    )


def env_snapshot(gpus: list[dict], cuda: str | None) -> dict:
    return {
        "python": "3.11.7",
        "platform": "Linux-6.8-x86_64",
        "torch": "2.13.0+cu128" if cuda else "2.13.0+cpu",
        "cuda": cuda,
        "cudnn": 91002 if cuda else None,
        "cuda_available": bool(gpus),
        "gpus": gpus,
        "nvidia_smi": None,
        "packages": {"difftrain": "0.1.0", "torch": "2.13.0", "diffusers": "0.35.1"},
        "git_commit": COMMIT,
    }


SMOKE_LOG = textwrap.dedent(
    """\
    tests/gpu/test_gpu_smoke.py::test_builtin PASSED
    tests/gpu/test_gpu_smoke.py::test_hub SKIPPED (offline)
    =============================== warnings summary ===============================
    /venv/lib/diffusers/x.py:12: FutureWarning: `upcast_vae` is deprecated   and will be removed
    /venv/lib/diffusers/x.py:12: FutureWarning: `upcast_vae` is deprecated and will be removed
    /venv/lib/diffusers/x.py:12: FutureWarning: `upcast_vae` is deprecated and will be removed
      warnings.warn(
    /venv/lib/torch/y.py:3: UserWarning: TF32 is off
    WARNING: not a python warning
    =================== 1 passed, 1 skipped, 4 warnings in 3.21s ===================
    """
)


@pytest.fixture
def fake_ci(tmp_path: Path) -> dict:
    """A `_ci_tmp/` with unit (pass/fail/skip) and gpu_smoke (properties, artifacts) results."""
    ci = tmp_path / "_ci_tmp"
    run = ci / "pytest_tmp" / "gpu_smoke" / "test_builtin0" / "a"
    unet = write(run / "unet" / "diffusion_pytorch_model.safetensors", b"fake weights" * 100)
    for name in ("scheduler/scheduler_config.json", "model_index.json", "config.yaml"):
        write(run / name, "{}\n")
    write(run / "env.json", json.dumps(env_snapshot([{"name": GPU, "memory_gib": 23.5}], "12.8")))
    write(run / "metrics.jsonl", '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": "nan"}\n')
    # A CPU env.json written after the GPU one: the report must still describe the GPU run.
    cpu_env = write(
        ci / "pytest_tmp" / "unit" / "t0" / "env.json", json.dumps(env_snapshot([], None))
    )
    os.utime(cpu_env, (2e9, 2e9))

    unet_value = f"{unet.stat().st_size} bytes sha256={sha256(unet.read_bytes())}"
    away_sha = "ab" * 32
    write(
        ci / "junit" / "unit.xml",
        junit(
            [
                case_xml("test_passes", 0.75),
                case_xml(
                    "test_fails",
                    0.5,
                    '<failure message="AssertionError: expected 3 got 4&#10;assert 4 == 3">'
                    "traceback</failure>",
                ),
                case_xml(
                    "test_skipped",
                    0.0,
                    '<skipped type="pytest.skip" message="marked slow: pass --run-slow to run">'
                    "x.py:3: marked slow</skipped>",
                ),
            ],
            time=1.25,
            failures=1,
            skipped=1,
        ),
    )
    smoke_props = {
        "output_dir": f"{REMOTE_ROOT}/gpu_smoke/test_builtin0/a",
        f"artifact:{'unet/diffusion_pytorch_model.safetensors'}": unet_value,
        "gpu": GPU,
        "torch": "2.13.0+cu128",
        "losses": "[0.5, 0.25]",
    }
    away_props = {
        "output_dir": "/home/runner/elsewhere/hub-run",
        "artifact:unet/diffusion_pytorch_model.safetensors": f"2048 bytes sha256={away_sha}",
    }
    write(
        ci / "junit" / "gpu_smoke.xml",
        junit(
            [case_xml("test_builtin", 42.5, properties=smoke_props)]
            + [case_xml("test_hub", 3.0, properties=away_props)],
            time=46.0,
        ),
    )
    write(ci / "logs" / "gpu_smoke.log", SMOKE_LOG)
    write(ci / "logs" / "text2image_smoke.log", SMOKE_LOG)  # nox tees the same output twice
    write(
        ci / "logs" / "nvidia-smi.txt",
        "| NVIDIA-SMI 550.54.14   Driver Version: 550.54.14   CUDA Version: 12.4 |\n",
    )
    write(
        ci / "logs" / "nvidia-smi.csv",
        "name, driver_version, memory.total [MiB], compute_cap\n"
        f"{GPU}, 550.54.14, 24564 MiB, 8.9\n",
    )
    return {"ci": ci, "unet_sha": sha256(unet.read_bytes()), "away_sha": away_sha}


FROM_MACHINE = "from the machine running the report, not from _ci_tmp"
FAKE_SMI = """#!/bin/sh
case "$*" in
  *--query-gpu*) echo "NVIDIA H200, 570.86.15, 143771 MiB, 9.0" ;;
  *) echo "| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8 |" ;;
esac
"""


def put_nvidia_smi(tmp_path: Path, monkeypatch, script: str) -> None:
    """An `nvidia-smi` first on PATH: the report's machine facts do not depend on this host."""
    folder = tmp_path / "fake-bin"
    tool = write(folder / "nvidia-smi", script)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture
def no_gpu_here(tmp_path: Path, monkeypatch) -> None:
    put_nvidia_smi(tmp_path, monkeypatch, "#!/bin/sh\nexit 9\n")


@pytest.fixture
def gpu_here(tmp_path: Path, monkeypatch) -> None:
    put_nvidia_smi(tmp_path, monkeypatch, FAKE_SMI)


def run_report(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["report", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def auto_blocks(report: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in MARKER.finditer(report)}


def test_report_fills_every_auto_block_from_the_ci_dir(
    fake_ci: dict, capsys, monkeypatch, gpu_here
) -> None:
    monkeypatch.chdir(fake_ci["ci"].parent)  # no docs/ here: the checkout's template is used
    code, out, err = run_report(capsys, "--ci-dir", str(fake_ci["ci"]))
    path = fake_ci["ci"] / "reports" / "mvp_smoke_checklist.md"
    assert (code, err) == (0, "")
    assert out.strip() == f"wrote {path}"
    report = path.read_text()
    blocks = auto_blocks(report)
    assert set(blocks) >= {"environment", "summary", "tests", "artifacts", "warnings", "nans"}
    for name, body in blocks.items():
        assert "____" not in body, f"auto:{name} still has blanks"

    # Summary: one row per runbook section.
    assert (
        "| 2. Unit tests | FAIL | 3 tests: 1 passed, 1 failed, 0 errors, 1 skipped; "
        "`_ci_tmp/junit/unit.xml` |"
    ) in report
    assert "| 3. GPU smoke via pytest | PASS | 2 tests: 2 passed, 0 failed" in report
    assert "| 4. CI-parity run | PASS | pytest: 1 passed, 1 skipped, 4 warnings;" in report
    assert "| 5. Debug path scripts (if used) | NOT RUN | optional" in report
    assert "| 1. Install | PASS (inferred) | env.json records difftrain 0.1.0" in report

    # Per-test lines with reasons, durations and recorded properties.
    assert "- PASS `tests.fake::test_passes` (0.75 s)" in report
    assert "- FAIL `tests.fake::test_fails` (0.50 s) — AssertionError: expected 3 got 4" in report
    assert (
        "- SKIP `tests.fake::test_skipped` (0.00 s) — marked slow: pass --run-slow to run" in report
    )
    assert f"  - gpu: `{GPU}`" in report
    assert "  - losses: `[0.5, 0.25]`" in report

    # Environment: the GPU run's env.json, not the newer CPU one; driver from nvidia-smi.
    env = blocks["environment"]
    assert f"| GPU model | {GPU} |" in env
    assert "| NVIDIA driver | 550.54.14 |" in env
    assert "| GPU memory | 24564 MiB |" in env
    assert "| CUDA (torch build / driver supports) | 12.8 / driver supports 12.4 |" in env
    assert "| PyTorch | 2.13.0+cu128 |" in env
    assert "| cuDNN | 91002 |" in env
    assert f"| difftrain commit | {COMMIT} |" in env
    assert "`_ci_tmp/pytest_tmp/gpu_smoke/test_builtin0/a/env.json` (newest of 2 found" in env

    # Artifacts: the remote output_dir is found again under this _ci_tmp and re-hashed; the
    # folder that is not here falls back to the recorded values, and says so.
    artifacts = blocks["artifacts"]
    assert "found at `_ci_tmp/pytest_tmp/gpu_smoke/test_builtin0/a`" in artifacts
    assert f"| {fake_ci['unet_sha']} | scanned; matches the recorded value |" in artifacts
    assert "| scheduler/scheduler_config.json | yes | 3 |" in artifacts
    assert (
        "output_dir `/home/runner/elsewhere/hub-run` not found here: sizes and sha256 below are "
        "as recorded by the test."
    ) in artifacts
    assert f"| 2048 | {fake_ci['away_sha']} | recorded by the test |" in artifacts
    assert "- [x] `_ci_tmp/logs/text2image_smoke.log`: present" in artifacts
    assert "- [x] `_ci_tmp/pytest_tmp`: present (7 files; folders: gpu_smoke, unit)" in artifacts

    # Warnings: 4 in gpu_smoke.log; the identical text2image_smoke.log is not counted again.
    warnings = blocks["warnings"]
    assert "Warning lines in logs: **4**" in warnings
    assert "`text2image_smoke.log`: same content as `gpu_smoke.log`" in warnings
    assert "- Distinct warnings: **2**" in warnings
    assert "| 3 | FutureWarning | `upcast_vae` is deprecated and will be removed |" in warnings
    assert "| 1 | UserWarning | TF32 is off |" in warnings

    assert "Non-finite loss: **YES**" in blocks["nans"]
    assert (
        "`_ci_tmp/pytest_tmp/gpu_smoke/test_builtin0/a/metrics.jsonl` line 2: loss=nan"
        in blocks["nans"]
    )
    assert "`tests.fake::test_fails` — AssertionError: expected 3 got 4" in blocks["failures"]
    assert "Driver Version: 550.54.14" in blocks["nvidia-smi"]
    assert blocks["nvidia-smi"].count("```") == 2
    assert "| unit | 3 | 1.25 | 1.25 | tests.fake::test_passes (0.75 s) |" in blocks["durations"]
    assert "2026-05-01T10:00:00+00:00 on gpu-box-7" in blocks["durations"]

    # The run: date and commit as the ci-dir recorded them; nothing from this machine (its
    # nvidia-smi would say H200), since an env.json names the machine that ran the tests.
    assert blocks["run"].splitlines() == [
        "- Run date/time (UTC): 2026-05-01 10:00 UTC (start of the earliest JUnit suite, "
        "`_ci_tmp/junit/unit.xml`)",
        f"- Repository commit (`git rev-parse HEAD`): `{COMMIT}` (from env.json "
        "`_ci_tmp/pytest_tmp/gpu_smoke/test_builtin0/a/env.json`)",
    ]
    assert "H200" not in report and "from the machine running the report" not in report

    # What a person must fill stays blank.
    assert "- Name: ____" in report
    assert "- Date: ____" in report
    assert "- Instance (provider, type, region / ID): ____" in report
    deviations = report.split("## 8. Deviations from the runbook")[1].split("## 9.")[0]
    assert "- ____" in deviations


def test_missing_ci_dir_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no_such_ci"
    code, out, err = run_report(capsys, "--ci-dir", str(missing))
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"difftrain: error: --ci-dir {missing}: folder not found;")
    assert not missing.exists()


def test_ci_dir_that_is_a_file_is_a_user_error(tmp_path: Path, capsys) -> None:
    not_a_folder = write(tmp_path / "_ci_tmp", "x")
    code, _, err = run_report(capsys, "--ci-dir", str(not_a_folder))
    assert code == 2 and "not a folder" in err and len(err.splitlines()) == 1


def test_empty_ci_dir_reports_not_run_and_not_found(tmp_path: Path, capsys, no_gpu_here) -> None:
    ci = tmp_path / "_ci_tmp"
    ci.mkdir()
    code, _, err = run_report(capsys, "--ci-dir", str(ci))
    assert (code, err) == (0, "")
    report = (ci / "reports" / "mvp_smoke_checklist.md").read_text()
    assert "| 1. Install | not found | no env.json and no passing test: fill by hand |" in report
    assert "| 2. Unit tests | NOT RUN | no `_ci_tmp/junit/unit.xml` |" in report
    assert "| 3. GPU smoke via pytest | NOT RUN | no `_ci_tmp/junit/gpu_smoke.xml` |" in report
    assert "| 4. CI-parity run | NOT RUN | `_ci_tmp/logs/text2image_smoke.log` not found" in report
    assert "| GPU model | not found |" in report
    assert "| NVIDIA driver | not found |" in report
    assert f"- env.json: not found under `_ci_tmp`; the table is filled {FROM_MACHINE}" in report
    assert "- [ ] `_ci_tmp/logs/text2image_smoke.log`: not found" in report
    assert "- [ ] `_ci_tmp/pytest_tmp`: not found" in report
    assert "no smoke training output in `_ci_tmp/pytest_tmp/**/test_smoke*`: not found." in report
    assert "- Warning lines in logs: not found" in report
    assert "- Non-finite loss: not found" in report
    assert (
        "Not captured: `_ci_tmp/logs/nvidia-smi.txt` not found and no `nvidia-smi` on the "
        "machine running the report" in report
    )
    assert "- Name: ____" in report


def test_fake_ci_dirs_left_by_tests_are_not_read_as_runs(
    fake_ci: dict, tmp_path: Path, capsys, no_gpu_here
) -> None:
    # `nox -s unit` runs these tests with --basetemp _ci_tmp/pytest_tmp/unit, so a real
    # _ci_tmp holds fake ones (a GPU env.json, a NaN loss) that must not count.
    ci = tmp_path / "real" / "_ci_tmp"
    (ci / "pytest_tmp" / "unit").mkdir(parents=True)
    fake_ci["ci"].rename(ci / "pytest_tmp" / "unit" / "_ci_tmp")
    write(ci / "pytest_tmp" / "unit" / "t1" / "out" / "metrics.jsonl", '{"step": 1, "loss": 0.5}\n')
    run_report(capsys, "--ci-dir", str(ci))
    report = (ci / "reports" / "mvp_smoke_checklist.md").read_text()
    assert "| GPU model | not found |" in report
    assert (
        "- Non-finite loss: no (checked 0 loss values recorded by 0 tests and 1 row in 1 metrics.jsonl file)"
        in report
    )
    assert "- [x] `_ci_tmp/pytest_tmp`: present" in report


def test_without_junit_the_smoke_output_folders_are_scanned(tmp_path: Path, capsys) -> None:
    # The runbook's CI-parity command writes no JUnit XML, only pytest_tmp/ and the log.
    ci = tmp_path / "_ci_tmp"
    smoke = ci / "pytest_tmp" / "test_smoke_builtin_model_is_de0" / "a"
    write(smoke / "unet" / "diffusion_pytorch_model.safetensors", b"smoke")
    write(
        ci
        / "pytest_tmp"
        / "unit"
        / "test_train0"
        / "out"
        / "unet"
        / "diffusion_pytorch_model.safetensors",
        b"unit",
    )
    run_report(capsys, "--ci-dir", str(ci))
    report = (ci / "reports" / "mvp_smoke_checklist.md").read_text()
    assert "smoke training output found in `_ci_tmp/pytest_tmp/**/test_smoke*`:" in report
    assert "#### `_ci_tmp/pytest_tmp/test_smoke_builtin_model_is_de0/a`" in report
    assert f"| unet/diffusion_pytorch_model.safetensors | yes | 5 | {sha256(b'smoke')} |" in report
    assert "| config.yaml | not found | - | - | missing from the folder, not recorded |" in report
    assert "test_train0" not in report


def test_recorded_hashes_are_checked_against_the_files(tmp_path: Path, capsys) -> None:
    # Like the determinism smoke test: two runs recorded, only run "a" named as output_dir.
    ci = tmp_path / "_ci_tmp"
    run_a = ci / "pytest_tmp" / "gpu_smoke" / "test_det0" / "a"
    config = write(run_a / "config.yaml", "seed: 0\n").read_bytes()
    env = write(run_a / "env.json", "{}").read_bytes()
    other, stale = "cd" * 32, "ef" * 32
    props = [
        ("output_dir", str(run_a)),
        ("artifact:config.yaml", f"{len(config)} bytes sha256={sha256(config)}"),
        ("artifact:env.json", f"{len(env)} bytes sha256={stale}"),
        ("artifact:config.yaml", f"9 bytes sha256={other}"),
        ("artifact:model_index.json", "garbled"),
    ]
    write(ci / "junit" / "gpu_smoke.xml", junit([case_xml("test_det", 1.0, properties=props)], 1.0))
    run_report(capsys, "--ci-dir", str(ci))
    report = (ci / "reports" / "mvp_smoke_checklist.md").read_text()
    assert (
        f"| config.yaml | yes | 8 | {sha256(config)} | scanned; matches the recorded value |"
        in report
    )
    assert (
        f"| config.yaml | yes (recorded) | 9 | {other} | recorded by the test (another run) |"
        in report
    )
    assert (
        f"| env.json | yes | 2 | {sha256(env)} | scanned; DIFFERS from the recorded value |"
        in report
    )
    assert (
        f"| env.json | yes (recorded) | 2 | {stale} | recorded by the test (differs from the file here) |"
        in report
    )
    assert (
        "| model_index.json | recorded | ? | ? | recorded by the test (missing from the folder): `garbled` |"
        in report
    )


def test_unreadable_junit_xml_is_a_failed_section(tmp_path: Path, capsys) -> None:
    ci = tmp_path / "_ci_tmp"
    write(ci / "junit" / "gpu_smoke.xml", '<?xml version="1.0"?><testsuites><testsuite')
    assert run_report(capsys, "--ci-dir", str(ci))[0] == 0
    report = (ci / "reports" / "mvp_smoke_checklist.md").read_text()
    assert re.search(r"\| 3\. GPU smoke via pytest \| FAIL \| JUnit XML unreadable \(", report)


def test_section_status_skip_not_run_and_other_sections(tmp_path: Path, capsys) -> None:
    ci = tmp_path / "_ci_tmp"
    skipped = '<skipped type="pytest.skip" message="CUDA is not available (torch 2.13.0+cpu)" />'
    write(ci / "junit" / "gpu_smoke.xml", junit([case_xml("test_smoke", 0.0, skipped)], 0.1))
    write(ci / "junit" / "unit.xml", junit([], time=0.0))  # e.g. everything deselected
    write(ci / "junit" / "integration.xml", junit([case_xml("test_scripts", 9.0)], time=9.0))
    write(ci / "junit" / "matrix-torch-2.14.1-cu130.xml", junit([case_xml("t", 1.0)], 1.0))
    write(ci / "logs" / "text2image_smoke.log", "collecting ...\n")  # killed before the end
    run_report(capsys, "--ci-dir", str(ci))
    report = (ci / "reports" / "mvp_smoke_checklist.md").read_text()
    assert "| 2. Unit tests | NOT RUN | 0 tests: 0 passed" in report
    assert (
        "| 3. GPU smoke via pytest | SKIP | 1 test: 0 passed, 0 failed, 0 errors, 1 skipped;"
        in report
    )
    assert (
        "- SKIP `tests.fake::test_smoke` (0.00 s) — CUDA is not available (torch 2.13.0+cpu)"
        in report
    )
    assert (
        "| 4. CI-parity run | UNKNOWN | `_ci_tmp/logs/text2image_smoke.log` has no pytest summary"
        in report
    )
    assert "| 5. Debug path scripts (if used) | PASS | 1 test: 1 passed" in report
    assert "| Other: matrix-torch-2.14.1-cu130 | PASS | 1 test: 1 passed" in report
    assert "- CI-parity run: UNKNOWN" in report


def test_template_option_fills_known_blocks_and_keeps_the_rest(
    fake_ci: dict, tmp_path: Path, capsys
) -> None:
    template = write(
        tmp_path / "mine.md",
        "# Mine\n<!-- auto:nans -->\n- ____\n<!-- /auto:nans -->\n"
        "<!-- auto:custom -->keep me<!-- /auto:custom -->\nSigned: ____\n",
    )
    code, _, _ = run_report(capsys, "--ci-dir", str(fake_ci["ci"]), "--template", str(template))
    report = (fake_ci["ci"] / "reports" / "mvp_smoke_checklist.md").read_text()
    assert code == 0
    assert report.startswith("# Mine\n<!-- auto:nans -->\n- Non-finite loss: **YES**")
    assert "<!-- auto:custom -->keep me<!-- /auto:custom -->" in report
    assert report.endswith("Signed: ____\n")


@pytest.mark.parametrize(
    ("template_text", "message"),
    [(None, "--template {path}: file not found;"), ("no markers\n", "has no <!-- auto:NAME -->")],
)
def test_bad_template_is_a_user_error(
    tmp_path: Path, capsys, template_text: str | None, message: str
) -> None:
    ci = tmp_path / "_ci_tmp"
    ci.mkdir()
    path = tmp_path / "template.md"
    if template_text is not None:
        write(path, template_text)
    code, _, err = run_report(capsys, "--ci-dir", str(ci), "--template", str(path))
    assert code == 2 and len(err.splitlines()) == 1
    assert message.format(path=path) in err
    assert not (ci / "reports" / "mvp_smoke_checklist.md").exists()


def test_losses_property_with_nan_is_detected(tmp_path: Path, capsys) -> None:
    ci = tmp_path / "_ci_tmp"
    case = case_xml("test_smoke", 1.0, properties={"losses": "[0.5, NaN]", "gpu": GPU})
    write(ci / "junit" / "gpu_smoke.xml", junit([case], time=1.0))
    run_report(capsys, "--ci-dir", str(ci))
    report = (ci / "reports" / "mvp_smoke_checklist.md").read_text()
    assert "  - losses: `[0.5, NaN]` **(non-finite!)**" in report
    assert "Non-finite loss: **YES** — NaN/inf detected in 1 place:" in report
    assert "`_ci_tmp/junit/gpu_smoke.xml` `tests.fake::test_smoke`: losses `[0.5, NaN]`" in report


@pytest.mark.parametrize("env_json", [True, False], ids=["env.json", "machine"])
def test_report_runs_without_torch(fake_ci: dict, tmp_path: Path, env_json: bool) -> None:
    # `nox -s report` installs only pyyaml and difftrain --no-deps: no torch may be imported,
    # neither to read the ci-dir nor to describe this machine when the ci-dir has no env.json.
    ci = fake_ci["ci"] if env_json else tmp_path / "empty" / "_ci_tmp"
    ci.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys\nfrom difftrain.cli import main\n"
        f"rc = main(['report', '--ci-dir', {str(ci)!r}])\n"
        "heavy = [m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules]\n"
        "print('RC', rc, 'HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "RC 0 HEAVY []" in result.stdout, result.stderr
    report = (ci / "reports" / "mvp_smoke_checklist.md").read_text()
    assert (FROM_MACHINE in report) != env_json


def head_commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def test_without_env_json_the_machine_running_the_report_fills_the_gaps(
    tmp_path: Path, capsys, gpu_here
) -> None:
    # The runbook's plain pytest path: no nox, so no env.json and no nvidia-smi capture.
    import torch

    ci = tmp_path / "_ci_tmp"
    ci.mkdir()
    before = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    assert run_report(capsys, "--ci-dir", str(ci))[0] == 0
    after = datetime.now(timezone.utc)
    blocks = auto_blocks((ci / "reports" / "mvp_smoke_checklist.md").read_text())

    env = blocks["environment"]
    assert "| GPU model | NVIDIA H200 |" in env
    assert "| GPU memory | 143771 MiB |" in env
    assert "| Compute capability | 9.0 |" in env
    assert "| NVIDIA driver | 570.86.15 |" in env
    torch_cuda = torch.version.cuda or "none (CPU build)"
    assert f"| CUDA (torch build / driver supports) | {torch_cuda} / driver supports 12.8 |" in env
    assert f"| Python | {platform.python_version()} |" in env
    assert f"| PyTorch | {torch.__version__} |" in env
    assert f"| difftrain version | {metadata.version('difftrain')} |" in env
    assert f"diffusers {metadata.version('diffusers')}, transformers " in env
    assert f"| Platform | {platform.platform()} |" in env
    assert FROM_MACHINE in env

    commit = head_commit()
    run_lines = blocks["run"].splitlines()
    if commit:
        assert f"| difftrain commit | {commit} |" in env
        assert run_lines[1] == (
            f"- Repository commit (`git rev-parse HEAD`): `{commit}` (the difftrain checkout "
            f"this report runs from; {FROM_MACHINE})"
        )
    stamp = re.match(
        r"- Run date/time \(UTC\): (\d{4}-\d\d-\d\d \d\d:\d\d) UTC \(now", run_lines[0]
    )
    assert stamp, run_lines[0]
    when = datetime.strptime(stamp[1], "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc)
    assert before <= when <= after and FROM_MACHINE in run_lines[0]

    smi = blocks["nvidia-smi"]
    assert f"`nvidia-smi` run now, {FROM_MACHINE}" in smi
    assert "Driver Version: 570.86.15   CUDA Version: 12.8" in smi


def test_run_time_is_when_the_smoke_log_was_written(tmp_path: Path, capsys, no_gpu_here) -> None:
    ci = tmp_path / "_ci_tmp"
    log = write(ci / "logs" / "text2image_smoke.log", "=== 1 passed in 3.00s ===\n")
    written = datetime(2026, 3, 4, 5, 6, tzinfo=timezone.utc).timestamp()
    os.utime(log, (written, written))
    run_report(capsys, "--ci-dir", str(ci))
    report = (ci / "reports" / "mvp_smoke_checklist.md").read_text()
    assert (
        "- Run date/time (UTC): 2026-03-04 05:06 UTC (when `_ci_tmp/logs/text2image_smoke.log` "
        "was last written: the end of the CI-parity run)"
    ) in report


def test_naive_junit_timestamps_say_they_are_local_time(tmp_path: Path, capsys) -> None:
    ci = tmp_path / "_ci_tmp"
    xml = junit([case_xml("t", 1.0)], 1.0).replace("+00:00", "")
    write(ci / "junit" / "unit.xml", xml)
    write(ci / "junit" / "gpu_smoke.xml", xml.replace("10:00:00", "11:30:00"))
    run_report(capsys, "--ci-dir", str(ci))
    report = (ci / "reports" / "mvp_smoke_checklist.md").read_text()
    assert (
        "- Run date/time (UTC): 2026-05-01 10:00 UTC (start of the earliest JUnit suite, "
        "`_ci_tmp/junit/unit.xml`) (the test machine's local time: the XML gives no offset)"
    ) in report


@pytest.mark.parametrize(
    ("version_py", "expected"),
    [
        ("__version__ = '2.13.0+cu128'\ncuda: Optional[str] = '12.8'\n", "12.8"),
        ('cuda = "11.8"\n', "11.8"),
        ("cuda: Optional[str] = None\n", "none (CPU build)"),
    ],
)
def test_torch_build_cuda_is_read_as_text(
    tmp_path: Path, monkeypatch, version_py: str, expected: str
) -> None:
    from difftrain.report import local_machine

    write(tmp_path / "torch" / "version.py", version_py)

    class FakeTorch:
        def locate_file(self, name: str) -> Path:
            return tmp_path / name

    monkeypatch.setattr(local_machine.metadata, "distribution", lambda name: FakeTorch())
    assert local_machine.torch_cuda() == expected


GENERATED_TESTS = """
import hashlib, json, warnings
import pytest

def test_passes(tmp_path, record_property):
    (tmp_path / "unet").mkdir()
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"w" * 64)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    record_property("output_dir", str(tmp_path))
    record_property("artifact:unet/diffusion_pytorch_model.safetensors", f"64 bytes sha256={digest}")
    record_property("gpu", "Fake GPU 9000")
    record_property("losses", json.dumps([0.5, float("nan")]))
    warnings.warn("careful: generated warning", UserWarning)

def test_fails():
    assert 1 == 2, "one is not two"

def test_skips():
    pytest.skip("no GPU here")

@pytest.fixture
def broken():
    raise RuntimeError("setup broke")

def test_errors(broken):
    pass

@pytest.mark.xfail(reason="known bug")
def test_xfails():
    assert False
"""


def test_parser_reads_the_junit_xml_pytest_writes(tmp_path: Path, capsys) -> None:
    """pytest's default junit_family (xunit2) still writes <properties> per test case."""
    ci, project = tmp_path / "_ci_tmp", tmp_path / "project"
    write(project / "pytest.ini", "[pytest]\n")  # isolates it from this repo's settings
    write(project / "test_generated.py", GENERATED_TESTS)
    (ci / "pytest_tmp").mkdir(parents=True)  # pytest creates --basetemp, not its parents
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-p",
            "no:cacheprovider",
            f"--junitxml={ci / 'junit' / 'gpu_smoke.xml'}",
            f"--basetemp={ci / 'pytest_tmp' / 'gpu_smoke'}",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr  # one test fails on purpose
    write(ci / "logs" / "gpu_smoke.log", result.stdout + result.stderr)

    assert run_report(capsys, "--ci-dir", str(ci))[0] == 0
    report = (ci / "reports" / "mvp_smoke_checklist.md").read_text()
    assert (
        "| 3. GPU smoke via pytest | FAIL | 5 tests: 1 passed, 1 failed, 1 errors, 2 skipped;"
        in report
    )
    lines = report.splitlines()

    def line_for(test: str) -> str:
        return next(line for line in lines if f"`test_generated::{test}`" in line)

    assert line_for("test_passes").startswith("- PASS ")
    assert line_for("test_fails").startswith("- FAIL ")
    assert line_for("test_fails").endswith(" — AssertionError: one is not two")
    assert line_for("test_skips").startswith("- SKIP ")
    assert line_for("test_skips").endswith(" — no GPU here")
    assert line_for("test_errors").endswith(
        ' — error: failed on setup with "RuntimeError: setup broke"'
    )
    assert line_for("test_xfails").endswith(" — xfail: known bug")
    assert "  - gpu: `Fake GPU 9000`" in report  # properties were written and read
    assert "  - losses: `[0.5, NaN]` **(non-finite!)**" in report
    assert "Non-finite loss: **YES**" in report
    assert f"| 64 | {sha256(b'w' * 64)} | scanned; matches the recorded value |" in report
    assert "found at `_ci_tmp/pytest_tmp/gpu_smoke/test_passes0`" in report
    assert "| 1 | UserWarning | careful: generated warning |" in report
