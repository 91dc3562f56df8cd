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


def test_real_tensorboard(tmp_path: Path) -> None:
    """With tensorboard installed, event files appear; without it, the run is refused."""
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(UserError, match="needs the tensorboard package; pip install"):
            RunTracker(tmp_path, report_to="tensorboard", max_steps=2)
        return
    tracker = RunTracker(tmp_path, report_to="tensorboard", max_steps=2, show_progress=False)
    tracker.log(record(1))
    tracker.close()
    assert list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))


class FakeSummaryWriter:
    def __init__(self, log_dir: str, purge_step: int | None = None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = 0

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def fake_tensorboard(monkeypatch) -> list[FakeSummaryWriter]:
    """torch.utils.tensorboard with a recording SummaryWriter (tensorboard may be absent)."""
    writers: list[FakeSummaryWriter] = []

    def make(*args, **kwargs):
        writers.append(FakeSummaryWriter(*args, **kwargs))
        return writers[-1]

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = make
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    monkeypatch.setattr(tracking, "check_tracker_available", lambda report_to: None)
    return writers


def test_tensorboard_gets_finite_numbers_at_their_step(tmp_path: Path, fake_tensorboard) -> None:
    tracker = RunTracker(tmp_path, report_to="tensorboard", max_steps=3, show_progress=False)
    tracker.log(record(1, 0.5, note="text"))
    tracker.log(record(2, float("nan"), skipped=True))
    tracker.close()
    tracker.close()
    (writer,) = fake_tensorboard
    assert writer.log_dir == str(tmp_path / "logs" / "tensorboard")
    assert writer.purge_step is None
    assert writer.closed == 1
    assert ("loss", 0.5, 1) in writer.scalars
    assert ("lr", 1e-4, 1) in writer.scalars
    assert ("skipped", 1.0, 2) in writer.scalars
    tags = {tag for tag, _, _ in writer.scalars}
    assert tags == {"loss", "lr", "skipped"}  # no step, None, text
    assert not any(tag == "loss" and step == 2 for tag, _, step in writer.scalars)  # NaN
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2  # the NaN line is still written


def test_tensorboard_purges_steps_after_the_resume_point(tmp_path: Path, fake_tensorboard) -> None:
    RunTracker(tmp_path, report_to="tensorboard", max_steps=9, start_step=4).close()
    assert fake_tensorboard[0].purge_step == 5


@pytest.fixture
def fake_wandb(monkeypatch) -> types.SimpleNamespace:
    calls = types.SimpleNamespace(init=[], log=[], finish=0)
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: calls.init.append(kwargs)
    module.log = lambda values, step: calls.log.append((values, step))

    def finish() -> None:
        calls.finish += 1

    module.finish = finish
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
