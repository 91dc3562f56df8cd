"""The run tracker: metrics.jsonl, the progress bar, the optional backends, the null twin."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from difftrain.errors import UserError
from difftrain.training import tracking
from difftrain.training.metrics import read_metrics
from difftrain.training.tracking import (
    NullTracker,
    RunTracker,
    build_tracker,
    check_tracker_available,
)


def record(step: int, loss: float = 0.5, **extra) -> dict[str, object]:
    return {"step": step, "loss": loss, "lr": 1e-4, "grad_norm": None, "skipped": False, **extra}


def public_names(obj) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


@pytest.fixture
def missing_package(monkeypatch):
    """Make `find_spec` report the named packages as not installed."""

    def install(*names: str) -> None:
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a)
        )

    return install


def test_writes_one_metrics_line_per_record(tmp_path: Path) -> None:
    tracker = RunTracker(tmp_path, report_to="none", max_steps=3, show_progress=False)
    tracker.log(record(1, 0.5))
    tracker.log(record(2, float("nan")))
    tracker.close()
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2]
    assert lines[0]["loss"] == 0.5
    assert lines[1]["loss"] == "nan"  # MetricsLog keeps every line valid JSON


def test_appends_to_existing_metrics(tmp_path: Path) -> None:
    for step in (1, 2):
        tracker = RunTracker(tmp_path, report_to="none", max_steps=2, show_progress=False)
        tracker.log(record(step))
        tracker.close()
    assert [line["step"] for line in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_progress_bar_shows_steps_loss_and_lr(tmp_path: Path, capsys) -> None:
    tracker = RunTracker(tmp_path, report_to="none", max_steps=3, show_progress=True)
    assert tracker.shows_progress
    tracker.log(record(1, 0.25))
    tracker.close()
    err = capsys.readouterr().err
    assert "1/3" in err
    assert "step" in err
    assert "loss=0.25" in err
    assert "lr=1.00e-04" in err


def test_progress_bar_starts_at_the_resumed_step(tmp_path: Path, capsys) -> None:
    tracker = RunTracker(tmp_path, report_to="none", max_steps=10, start_step=4, show_progress=True)
    tracker.log(record(5))
    tracker.close()
    err = capsys.readouterr().err
    assert "4/10" in err
    assert "5/10" in err


def test_no_progress_bar_when_stderr_is_not_a_tty(tmp_path: Path, capsys) -> None:
    assert not sys.stderr.isatty()  # pytest captures stderr
    tracker = RunTracker(tmp_path, report_to="none", max_steps=3)
    assert not tracker.shows_progress
    tracker.log(record(1))
    tracker.close()
    assert capsys.readouterr().err == ""


def test_progress_bar_follows_a_tty(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    tracker = RunTracker(tmp_path, report_to="none", max_steps=3)
    assert tracker.shows_progress
    tracker.close()


def test_close_is_idempotent(tmp_path: Path) -> None:
    tracker = RunTracker(tmp_path, report_to="none", max_steps=3, show_progress=True)
    closes = []
    real_close = tracker._metrics.close
    tracker._metrics.close = lambda: closes.append(1) or real_close()
    tracker.close()
    tracker.close()
    assert closes == [1]  # backends (wandb.finish, the writer) are closed once, not twice
    assert tracker._metrics._file.closed and tracker._bar.disable
    NullTracker().close()


def test_null_tracker_has_every_public_method() -> None:
    assert public_names(RunTracker) <= public_names(NullTracker)
    null = NullTracker()
    assert null.shows_progress is False
    null.log(record(1))


def test_build_tracker_by_process(tmp_path: Path) -> None:
    assert isinstance(build_tracker(False, output_dir=tmp_path, report_to="none"), NullTracker)
    assert not (tmp_path / "metrics.jsonl").exists()
    tracker = build_tracker(True, output_dir=tmp_path, report_to="none", max_steps=1)
    assert isinstance(tracker, RunTracker)
    tracker.close()
    assert (tmp_path / "metrics.jsonl").exists()


def test_none_needs_no_package(missing_package, tmp_path: Path) -> None:
    missing_package("tensorboard", "wandb")
    with pytest.raises(UserError):  # the packages really look missing here...
        check_tracker_available("tensorboard")
    tracker = RunTracker(tmp_path, report_to="none", max_steps=1, show_progress=False)
    tracker.log(record(1))  # ...and `none` still tracks, to metrics.jsonl alone
    tracker.close()
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1]


@pytest.mark.parametrize("report_to", ["tensorboard", "wandb"])
def test_missing_tracker_package_is_a_user_error(report_to: str, missing_package) -> None:
    missing_package(report_to)
    with pytest.raises(UserError) as raised:
        check_tracker_available(report_to)
    message = str(raised.value)
    assert message.startswith(f"train.report_to: {report_to} needs the {report_to} package")
    assert f"pip install {report_to}" in message
    assert "train.report_to: none" in message


def test_missing_package_is_refused_before_metrics_are_opened(
    tmp_path: Path, missing_package
) -> None:
    missing_package("wandb")
    with pytest.raises(UserError, match="wandb package"):
        RunTracker(tmp_path, report_to="wandb", max_steps=1)
    assert not (tmp_path / "metrics.jsonl").exists()


def tensorboard_events(folder: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboard_gets_finite_numbers_and_images_at_their_step(tmp_path: Path) -> None:
    """Real event files, read back (a whole run's are checked in test_trackers_real.py)."""
    pytest.importorskip("tensorboard")
    from PIL import Image

    grid = tmp_path / "grid.png"
    Image.new("RGB", (24, 16), (200, 30, 60)).save(grid)
    tracker = RunTracker(tmp_path, report_to="tensorboard", max_steps=3, show_progress=False)
    tracker.log(record(1, 0.5, note="text"))
    tracker.log(record(2, float("nan"), skipped=True))
    tracker.log_image("samples", grid, 2)
    tracker.close()
    tracker.close()

    events = tensorboard_events(tmp_path / "logs" / "tensorboard")
    assert set(events.Tags()["scalars"]) == {"loss", "lr", "skipped"}  # no step, None, text
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5)]  # NaN left out
    assert [(e.step, e.value) for e in events.Scalars("skipped")] == [(1, 0.0), (2, 1.0)]
    (image,) = events.Images("samples")
    assert (image.step, image.width, image.height) == (2, 24, 16)
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2  # the NaN line is still written


@pytest.fixture
def fake_wandb(monkeypatch) -> types.SimpleNamespace:
    """A recording `wandb` module, for what `wandb.init` is asked (the run id on resume).

    What a real (offline) W&B run records is read back in test_trackers_real.py.
    """
    calls = types.SimpleNamespace(init=[], log=[], finish=0)

    def finish() -> None:
        calls.finish += 1

    run = types.SimpleNamespace(
        log=lambda values, step: calls.log.append((values, step)), finish=finish
    )
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: calls.init.append(kwargs) or run
    module.Settings = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setattr(tracking, "check_tracker_available", lambda report_to: None)
    return calls


def test_wandb_run_is_resumed_by_its_stored_id(tmp_path: Path, fake_wandb) -> None:
    config = {"train": {"max_steps": 3}}
    tracker = RunTracker(tmp_path, report_to="wandb", max_steps=3, run_config=config)
    tracker.log(record(1, 0.5))
    tracker.close()
    tracker.close()
    RunTracker(tmp_path, report_to="wandb", max_steps=3, start_step=1).close()

    first, second = fake_wandb.init
    assert first["project"] == "difftrain"
    assert first["dir"] == str(tmp_path / "logs")
    assert first["config"] == config
    assert first["resume"] == "allow"
    assert first["id"] and second["id"] == first["id"]
    assert fake_wandb.log == [({"loss": 0.5, "lr": 1e-4, "skipped": 0.0}, 1)]
    assert fake_wandb.finish == 2


def test_failed_backend_leaves_nothing_open(tmp_path: Path, monkeypatch) -> None:
    module = types.ModuleType("torch.utils.tensorboard")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    module.SummaryWriter = broken
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    monkeypatch.setattr(tracking, "check_tracker_available", lambda report_to: None)
    closed = []
    monkeypatch.setattr(tracking.MetricsLog, "close", lambda self: closed.append(self))
    with pytest.raises(OSError, match="disk full"):
        RunTracker(tmp_path, report_to="tensorboard", max_steps=1)
    assert len(closed) == 1
