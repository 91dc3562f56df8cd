"""`train.push_to_hub`: what goes up, when, and what a failed upload leaves.

The Hub is out of reach here, so `HubStandIn` plays it: a local HTTP server answering the few
endpoints an upload calls (create repo, validate the card, preupload, commit), storing each
committed file under its root. Everything between difftrain and the socket is
huggingface_hub's own code (HfApi, upload_folder, its HTTP client, auth headers and errors),
and the `hf upload` command a failed run prints is run for real against it. Every test uses a
fake token and a private HF_HOME: the user's own token and cache are never read.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from difftrain.cli import main as cli_main
from difftrain.config import config_from_dict
from difftrain.config.schema import HubConfig
from difftrain.errors import UserError
from difftrain.io import sha256_file
from difftrain.training import hub_upload
from difftrain.training.hub_upload import (
    HubUploadFailed,
    HubUploads,
    check_hub_upload,
    upload_patterns,
)
from difftrain.training.trainer import train
from hub_stand_in import REPO, HubStandIn

FAKE_TOKEN = "hf_difftrainTestToken0123456789"
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
"""The components of the built-in tiny SD pipeline (its model_index.json)."""


@pytest.fixture
def hub_home(tmp_path: Path, monkeypatch) -> Path:
    """A private HF_HOME and a fake HF_TOKEN, online: huggingface_hub's paths point into it.

    huggingface_hub reads HF_HOME and HF_HUB_OFFLINE at import, so its constants are
    re-pointed too (offline mode may be on for the test session, as nox sets it).
    """
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    old_home = constants.HF_HOME
    for name, value in list(vars(constants).items()):
        if isinstance(value, str) and value.startswith(old_home):
            monkeypatch.setattr(constants, name, str(home) + value[len(old_home) :])
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HOME", str(home))
    return home


@pytest.fixture
def stand_in(tmp_path: Path, hub_home: Path, monkeypatch) -> HubStandIn:
    from huggingface_hub import constants

    hub = HubStandIn(tmp_path / "remote")
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    yield hub
    hub.stop()


def hub_config(out: Path, data_dir: Path, **sections):
    raw = {
        "model": {"pretrained": "builtin:tiny"},
        "data": {"train_dir": str(data_dir), "resolution": 64},
        "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 2,
                  "learning_rate": 1e-3, "push_to_hub": True},
        "checkpointing": {"every_steps": 0},
        "hub": {"repo_id": REPO},
    }  # fmt: skip
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def local_files(out: Path, names: list[str]) -> dict[str, bytes]:
    """The files of `out` under each of `names` (a file or a folder), by relative path."""
    found = {}
    for name in names:
        path = out / name
        paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        found.update({p.relative_to(out).as_posix(): p.read_bytes() for p in paths})
    return found


VALIDATION = {"prompts": ["a red circle"], "every_steps": 2, "num_inference_steps": 2}


def test_full_fine_tune_uploads_the_pipeline_card_config_and_last_grid(
    stand_in: HubStandIn, tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    cfg = hub_config(out, dummy_data_dir, train={"max_steps": 4}, validation=VALIDATION,
                     checkpointing={"every_steps": 2})  # fmt: skip
    train(cfg)

    expected = local_files(
        out, ["README.md", "config.yaml", "model_index.json", *PIPELINE_PARTS, "samples/step-4.png"]
    )
    remote = stand_in.files()
    assert sorted(remote) == sorted(expected)  # no checkpoints, logs, metrics, step-2 grid
    assert all(remote[name] == data for name, data in expected.items())
    assert (out / "samples" / "step-2.png").is_file() and (out / "checkpoint-4").is_dir()
    # What arrived is a whole pipeline, with the card that names its sample grid.
    StableDiffusionPipeline.from_pretrained(stand_in.root / REPO)
    assert "samples/step-4.png" in remote["README.md"].decode()
    # One private repository, one commit, every request authenticated with the fake token.
    assert [c["visibility"] for c in stand_in.created] == ["private"]
    assert [summary for _, summary, _ in stand_in.commits] == ["difftrain: trained 4 steps"]
    api_calls = [r for r in stand_in.requests if r[1] != "/api/agent-harnesses"]
    assert api_calls and all(auth == f"Bearer {FAKE_TOKEN}" for _, _, auth in api_calls)
    # The token is in no file the run wrote.
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written and not any(FAKE_TOKEN.encode() in p.read_bytes() for p in written)


def test_lora_uploads_the_adapter_card_and_config(
    stand_in: HubStandIn, tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "out"
    lora = {"enabled": True, "export_formats": ["diffusers", "kohya"]}
    train(hub_config(out, dummy_data_dir, lora=lora, hub={"private": False}))
    remote = stand_in.files()
    lora_files = ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"]
    assert sorted(remote) == sorted(["README.md", "config.yaml", *lora_files])
    assert remote == local_files(out, sorted(remote))
    assert [c["visibility"] for c in stand_in.created] == ["public"]


def test_every_lora_export_and_only_the_last_grid_are_in_the_patterns(tmp_path: Path) -> None:
    from huggingface_hub.utils import filter_repo_objects

    names = ["README.md", "config.yaml", "pytorch_lora_weights.safetensors",
             "pytorch_lora_weights_kohya.safetensors", "samples/step-2.png", "samples/step-4.png",
             "checkpoint-4/pytorch_lora_weights.safetensors", "checkpoint-4/config.yaml",
             "metrics.jsonl", "env.json", "logs/train.log", ".difftrain.lock",
             ".README.md.x.difftrain-tmp"]  # fmt: skip
    patterns = upload_patterns(tmp_path, lora=True, last_grid=tmp_path / "samples/step-4.png")
    assert sorted(filter_repo_objects(names, allow_patterns=patterns)) == [
        "README.md", "config.yaml", "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_kohya.safetensors", "samples/step-4.png",
    ]  # fmt: skip


def test_checkpoints_are_pushed_as_saved_even_when_pruned(
    stand_in: HubStandIn, tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path, monkeypatch
) -> None:
    # Uploads answer slowly: checkpoint-2 is still uploading when checkpoint-4 is written and
    # total_limit 1 prunes it. The run waits for that upload instead of deleting it mid-way.
    real = stand_in._answer

    def slow(method, path, auth, body):
        if "/preupload/" in path:
            time.sleep(1.0)
        return real(method, path, auth, body)

    monkeypatch.setattr(stand_in, "_answer", slow)
    out = tmp_path / "out"
    cfg = hub_config(out, dummy_data_dir, train={"max_steps": 4}, hub={"push_checkpoints": True},
                     checkpointing={"every_steps": 2, "total_limit": 1})  # fmt: skip
    train(cfg)

    assert not (out / "checkpoint-2").exists()  # pruned locally...
    remote = stand_in.files()
    manifest = json.loads(remote["checkpoints/checkpoint-2/manifest.json"])
    for name, facts in manifest["files"].items():  # ...and complete on the Hub
        path = stand_in.root / REPO / "checkpoints" / "checkpoint-2" / name
        assert sha256_file(path) == facts["sha256"], name
    assert local_files(out, ["checkpoint-4"]) == {
        name.removeprefix("checkpoints/"): data
        for name, data in remote.items()
        if name.startswith("checkpoints/checkpoint-4/")
    }
    assert [summary for _, summary, _ in stand_in.commits] == [
        "difftrain: checkpoint-2", "difftrain: checkpoint-4", "difftrain: trained 4 steps",
    ]  # fmt: skip
    assert not any(name.startswith("checkpoint-") for name in remote)  # only under checkpoints/


def test_checkpoint_uploads_do_not_block_and_pruning_waits_a_bounded_time(
    stand_in: HubStandIn, tmp_path: Path, monkeypatch, caplog
) -> None:
    folder = tmp_path / "run" / "checkpoint-2"
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"\x01" * 1000)
    stand_in.hold.add("commit")
    monkeypatch.setattr(hub_upload, "PEER_WAIT_S", 0.5)
    uploads = HubUploads(HubConfig(repo_id=REPO, push_checkpoints=True), folder.parent,
                         peers_wait=True)  # fmt: skip
    uploads.push_checkpoint(folder)
    assert stand_in.arrived.wait(timeout=30)  # the upload is under way, training is not held
    assert stand_in.files() == {}
    monkeypatch.setattr(hub_upload, "list_checkpoints", lambda out: [(2, folder)])
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="difftrain"):
        uploads.before_checkpoint(total_limit=1)  # would prune checkpoint-2: waits, bounded
    assert 0.4 < time.monotonic() - started < 10
    assert "checkpoint-2 is still uploading after 0.5 s and is pruned now" in caplog.text
    stand_in.release.set()
    uploads.wait()
    assert stand_in.files() == {"checkpoints/checkpoint-2/weights.bin": b"\x01" * 1000}


@pytest.mark.parametrize("total_limit", [None, 1])
def test_a_failed_checkpoint_upload_is_a_warning_and_training_goes_on(
    stand_in: HubStandIn,
    tmp_path: Path,
    dummy_data_dir: Path,
    tiny_model_dir: Path,
    caplog,
    total_limit: int | None,
) -> None:
    real = stand_in._answer
    calls = []

    def first_commit_fails(method, path, auth, body):
        if "/commit/" in path and not calls:
            calls.append(path)
            return 403, {"error": "stand-in refuses this one"}
        return real(method, path, auth, body)

    stand_in._answer = first_commit_fails
    out = tmp_path / "out"
    cfg = hub_config(out, dummy_data_dir, train={"max_steps": 2}, hub={"push_checkpoints": True},
                     lora={"enabled": True},
                     checkpointing={"every_steps": 1, "total_limit": total_limit})  # fmt: skip
    with caplog.at_level("WARNING", logger="difftrain"):
        result = train(cfg)
    assert result.steps == 2
    warning = next(r.getMessage() for r in caplog.records if "checkpoint-1" in r.getMessage())
    assert warning.startswith("could not upload checkpoint-1 to the Hub (")
    assert f"hf upload {REPO} {out / 'checkpoint-1'} checkpoints/checkpoint-1" in warning
    # A checkpoint the limit is about to prune: the later command would find no folder.
    pruned = "before checkpointing.total_limit prunes it (raise the limit to keep it)"
    assert warning.endswith(pruned) == (total_limit is not None)
    remote = stand_in.files()
    assert not any(name.startswith("checkpoints/checkpoint-1/") for name in remote)
    assert any(name.startswith("checkpoints/checkpoint-2/") for name in remote)
    assert "pytorch_lora_weights.safetensors" in remote


def hf_command(line: str) -> list[str]:
    """The `hf upload ...` command quoted in an error line, as argv with this venv's `hf`."""
    command = shlex.split(re.search(r"`(hf upload [^`]*)`", line)[1])
    return [str(Path(sys.executable).with_name("hf")), *command[1:]]


@pytest.mark.parametrize(
    "failure",
    [
        {"commit": 401},
        {"create": 403},
        {"commit": 409},
        "network down",
    ],
    ids=["unauthorized", "forbidden", "conflict", "network-down"],
)
def test_a_failed_final_upload_is_one_line_exit_2_and_keeps_the_outputs(
    failure, stand_in: HubStandIn, tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path,
    hub_home: Path, capsys,
) -> None:  # fmt: skip
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{pretrained: 'builtin:tiny'}}\n"
        f"data: {{train_dir: '{dummy_data_dir}', resolution: 64}}\n"
        "train: {max_steps: 1, batch_size: 2, push_to_hub: true}\n"
        "checkpointing: {every_steps: 0}\nlora: {enabled: true}\n"
        f"hub: {{repo_id: {REPO}}}\n"
    )
    if failure == "network down":
        stand_in.stop()
    else:
        stand_in.fail.update(failure)

    code = cli_main(["train", "--config", str(config), "--output-dir", str(out)])

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("difftrain: error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    line = errors[0]
    assert line.startswith(
        f"difftrain: error: could not upload the outputs to the Hub repository {REPO} ("
    )
    assert f"they are complete in {out}: upload them later with `hf upload {REPO} {out} ." in line
    assert FAKE_TOKEN not in err
    lora = out / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and (out / "README.md").is_file()  # the outputs are all there
    assert stand_in.files() == {}

    # The printed command uploads exactly what the run would have, once the Hub answers.
    hub = HubStandIn(tmp_path / "remote-later")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_OFFLINE"))}  # fmt: skip
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=FAKE_TOKEN, HF_HOME=str(hub_home),
               HF_HUB_DISABLE_PROGRESS_BARS="1")  # fmt: skip
    try:
        done = subprocess.run(hf_command(line), env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert hub.files() == local_files(out, ["README.md", "config.yaml", lora.name])
    finally:
        hub.stop()


def test_ctrl_c_while_uploading_gives_up_the_upload_not_the_outputs(
    stand_in: HubStandIn, tmp_path: Path
) -> None:
    (tmp_path / "README.md").write_text("# a card\n")
    stand_in.hold.add("commit")
    uploads = HubUploads(HubConfig(repo_id=REPO), tmp_path, peers_wait=False)
    original = signal.getsignal(signal.SIGINT)

    def interrupt_once_waiting() -> None:
        stand_in.arrived.wait(timeout=30)
        deadline = time.monotonic() + 30
        while signal.getsignal(signal.SIGINT) is original and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_waiting, daemon=True).start()
    uploads.push_outputs(["README.md"], steps=3)
    with pytest.raises(HubUploadFailed) as raised:
        uploads.wait()
    assert raised.value.exit_code == 130
    assert "(interrupted by SIGINT)" in str(raised.value)
    assert f"upload them later with `hf upload {REPO} {tmp_path} . --include README.md" in str(
        raised.value
    )
    assert signal.getsignal(signal.SIGINT) is original
    assert (tmp_path / "README.md").read_text() == "# a card\n"


# --- refusals at start (the bad-input table runs them through the CLI: bad_inputs_hub.py) ---


def test_refusals_name_the_key_and_the_fix(hub_home: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    check_hub_upload(False, HubConfig())  # nothing to check when not pushing
    with pytest.raises(UserError, match=r"^train.push_to_hub: true needs hub.repo_id"):
        check_hub_upload(True, HubConfig())
    for bad in ("a/b/c", "no spaces", "x--y", "-lead"):
        with pytest.raises(UserError, match=rf"^hub.repo_id: '{re.escape(bad)}' is not a Hub"):
            check_hub_upload(True, HubConfig(repo_id=bad))
    check_hub_upload(True, HubConfig(repo_id=REPO))  # token, online: fine
    check_hub_upload(True, HubConfig(repo_id="just-a-name"))  # the user's own namespace
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UserError, match=r"no Hugging Face token found; run `hf auth login` or"):
        check_hub_upload(True, HubConfig(repo_id=REPO))
    (hub_home / "token").parent.mkdir(parents=True, exist_ok=True)
    (hub_home / "token").write_text("hf_fromTheTokenFile\n")  # `hf auth login` writes this
    check_hub_upload(True, HubConfig(repo_id=REPO))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"^train.push_to_hub: HF_HUB_OFFLINE"):
        check_hub_upload(True, HubConfig(repo_id=REPO))


def test_no_upload_is_attempted_without_push_to_hub(
    stand_in: HubStandIn, tmp_path: Path, dummy_data_dir: Path, tiny_model_dir: Path
) -> None:
    # hub.repo_id stays set, as a user toggling uploads leaves it (push_checkpoints without
    # push_to_hub is refused: tests/unit/bad_inputs_hub.py).
    cfg = hub_config(tmp_path / "out", dummy_data_dir, train={"push_to_hub": False, "max_steps": 1},
                     checkpointing={"every_steps": 1})  # fmt: skip
    train(cfg)
    assert stand_in.requests == []
