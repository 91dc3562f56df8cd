"""`difftrain report RUN_DIR`: report.html of a real tiny run, read back as a browser would.

    .venv/bin/python -m pytest tests/unit/test_run_report.py -p no:xdist -v

The page is parsed with html.parser (images decoded with PIL, grids in step order, config
and data as in the files, user text escaped, nothing fetched from the network); where a
headless Chromium is installed (`apt-get install -y chromium`, or DIFFTRAIN_TEST_BROWSER
names one) it is also opened from a file:// URL, with name lookups blocked, and what it drew
is checked. Synthetic run folders cover what a tiny run does not make (buckets, skipped
images, non-finite losses, a resumed run, older runs' missing files).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftrain.cli import main
from difftrain.config import config_from_dict
from difftrain.report.card_section import BEGIN, END
from difftrain.report.markdown import human_size
from difftrain.training.output_lock import LOCK_FILE, OutputLock
from difftrain.training.run_dir import RUN_MARKER

SCRIPT_PROMPT = "<script>alert('x')</script> & \"quoted\""
PLOT_NAMES = ("loss", "lr", "grad_norm", "val_loss")


class Page(HTMLParser):
    """What a test needs of report.html: tags with their attributes, and texts by id / key."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[tuple[str, dict]] = []
        self.texts: dict[str, str] = {}  # id -> text inside the element
        self.keyed: dict[str, str] = {}  # data-key row -> its <td> text
        self.list_items: list[str] = []
        self.figure_imgs: dict[str, str] = {}  # figure id -> its img src
        self.feed(text)
        self.close()

    VOID = {"img", "meta", "br", "link", "input", "hr"}

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "img":
            figure = next((a.get("id") for t, a in reversed(self.stack) if t == "figure"), None)
            if figure:
                self.figure_imgs[figure] = attributes.get("src", "")
        if tag not in self.VOID:
            self.stack.append((tag, attributes))
            if tag == "li":
                self.list_items.append("")

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        for _tag, attributes in self.stack:
            if "id" in attributes:
                self.texts[attributes["id"]] = self.texts.get(attributes["id"], "") + data
        row = next((a["data-key"] for t, a in self.stack if "data-key" in a), None)
        if row is not None and self.stack[-1][0] == "td":
            self.keyed[row] = self.keyed.get(row, "") + data
        if self.stack and self.stack[-1][0] == "li":
            self.list_items[-1] += data

    def ids(self, prefix: str) -> list[str]:
        return [a["id"] for _, a in self.tags if a.get("id", "").startswith(prefix)]


def report(capsys, run_dir: Path) -> tuple[int, str, str]:
    code = main(["report", str(run_dir)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_page(run_dir: Path) -> Page:
    return Page((run_dir / "report.html").read_text(encoding="utf-8"))


def decoded(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return base64.b64decode(src[len(prefix) :], validate=True)


def assert_self_contained(page: Page) -> None:
    """No script, and nothing a browser would fetch: every src is a data URI, every href a
    relative link or an anchor."""
    assert not [tag for tag, _ in page.tags if tag in ("script", "iframe", "object", "embed")]
    for tag, attributes in page.tags:
        for name in ("src", "href"):
            value = attributes.get(name)
            if value is None:
                continue
            assert not value.lower().startswith(("http:", "https:", "//", "javascript:")), (
                tag,
                value,
            )
            if name == "src":
                assert value.startswith("data:image/"), (tag, value[:60])


def curve_pixels(image: Image.Image) -> int:
    """Pixels of the curves' colour (matplotlib's first colour, C0 #1f77b4)."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(pixels - [0x1F, 0x77, 0xB4]).max(axis=-1) < 40).sum())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- a real tiny run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, dummy_data_dir: Path, tiny_model_dir: Path) -> Path:
    """Ten steps with a checkpoint at the end, validation grids and a validation loss every
    five steps: samples/step-5.png and step-10.png, whose names sort the wrong way round as
    text."""
    from difftrain.training.trainer import train

    out = tmp_path_factory.mktemp("run-report") / "out"
    raw = {
        "model": {"pretrained": "builtin:tiny"},
        "data": {"train_dir": str(dummy_data_dir), "resolution": 64},
        "train": {"output_dir": str(out), "max_steps": 10, "batch_size": 2,
                  "learning_rate": 1e-3, "lr_scheduler": "constant_with_warmup",
                  "lr_warmup_steps": 3},
        "checkpointing": {"every_steps": 10},
        "validation": {"prompts": ["a red circle", SCRIPT_PROMPT], "every_steps": 5,
                       "num_inference_steps": 2, "loss_every_steps": 5,
                       "loss_dir": str(dummy_data_dir)},
    }  # fmt: skip
    train(config_from_dict(raw))
    return out


@pytest.fixture(scope="module")
def reported_run(trained_run: Path) -> dict:
    """The run after `difftrain report RUN_DIR`, with the model card as training wrote it."""
    card_before = (trained_run / "README.md").read_text(encoding="utf-8")
    code = main(["report", str(trained_run)])
    return {"run": trained_run, "code": code, "card_before": card_before}


def test_report_of_a_real_run_is_one_self_contained_page(reported_run: dict) -> None:
    run = reported_run["run"]
    assert reported_run["code"] == 0
    page = read_page(run)
    assert_self_contained(page)
    # Every plot is drawn, embedded and also written as the file the model card links.
    for name in PLOT_NAMES:
        embedded = decoded(page.figure_imgs[f"plot-{name}"])
        assert embedded == (run / "report" / f"{name}.png").read_bytes()
        image = Image.open(io.BytesIO(embedded))
        image.load()
        assert image.width > 100 and image.height > 100
        assert curve_pixels(image) > 50, name  # a curve is drawn, not only the axes
    assert "factor" in page.texts["plot-loss"]  # the smoothing is stated


def test_grids_appear_in_step_order_and_are_the_files(reported_run: dict) -> None:
    run = reported_run["run"]
    page = read_page(run)
    steps = sorted(int(p.stem.split("-")[1]) for p in (run / "samples").glob("step-*.png"))
    assert len(steps) >= 2 and sorted(map(str, steps)) != list(map(str, steps))
    assert page.ids("grid-step-") == [f"grid-step-{step}" for step in steps]
    for step in steps:
        embedded = decoded(page.figure_imgs[f"grid-step-{step}"])
        assert embedded == (run / "samples" / f"step-{step}.png").read_bytes()


def test_config_data_checkpoints_and_summary_match_the_files(reported_run: dict) -> None:
    run = reported_run["run"]
    page = read_page(run)
    assert page.texts["config-yaml"] == (run / "config.yaml").read_text(encoding="utf-8")

    manifest = json.loads((run / "data_manifest.json").read_text())
    assert page.keyed["images"] == str(len(manifest["files"]))
    data_text = page.texts["data"]
    for source in manifest["sources"]:
        assert source["id"] in data_text

    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints
    text = page.texts["checkpoints"]
    for folder in checkpoints:
        assert f"{folder.name}{folder.name.split('-')[1]}{human_size(folder_bytes(folder))}yes" in (
            text.replace("\n", "")
        )

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert page.keyed["Steps recorded"] == f"{len(rows)} (steps 1 to {rows[-1]['step']})"
    assert page.keyed["Final loss"] == f"{rows[-1]['loss']:.6g}"
    env = json.loads((run / "env.json").read_text())
    assert page.keyed["python"] == env["python"]
    assert page.keyed["packages.torch"] == env["packages"]["torch"]


def test_user_text_is_escaped(reported_run: dict) -> None:
    run = reported_run["run"]
    text = (run / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    assert SCRIPT_PROMPT in page.list_items  # shown as text ...
    assert "<script>alert" not in text  # ... and never as markup
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in text


def test_model_card_links_the_report_and_keeps_the_rest(reported_run: dict, capsys) -> None:
    run, before = reported_run["run"], reported_run["card_before"]
    card = (run / "README.md").read_text(encoding="utf-8")
    assert card.startswith(before)  # training's card kept byte for byte
    section = card[len(before) :]
    assert section.count(BEGIN) == 1 and section.count(END) == 1
    assert "## Training report" in section and "(report.html)" in section
    for name in PLOT_NAMES:
        assert f"(report/{name}.png)" in section
        assert (run / "report" / f"{name}.png").is_file()

    # Again: the same card. With notes written under the section: replaced, notes kept.
    assert report(capsys, run)[0] == 0
    assert (run / "README.md").read_text(encoding="utf-8") == card
    notes = "\n## My notes\n\nkeep me\n"
    (run / "README.md").write_text(card.replace(END, END + notes), encoding="utf-8")
    assert report(capsys, run)[0] == 0
    again = (run / "README.md").read_text(encoding="utf-8")
    assert again == card.replace(END, END + notes)


def test_while_a_run_holds_the_folder_the_card_is_left_alone(reported_run: dict, capsys) -> None:
    run = reported_run["run"]
    card = (run / "README.md").read_bytes()
    (run / "report.html").unlink()
    with OutputLock(run):
        code, out, err = report(capsys, run)
    assert (code, err) == (0, "")
    assert "README.md left alone: a training run holds this folder" in out
    assert (run / "report.html").is_file()
    assert (run / "README.md").read_bytes() == card


def test_the_lock_file_training_left_stays(reported_run: dict) -> None:
    # Training leaves its lock file (removing it would race a waiting run): a normal part of
    # a run folder, which the report, taking the same lock, keeps.
    assert (reported_run["run"] / LOCK_FILE).is_file()


# --- headless browser ------------------------------------------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
PROBE = """<script>
// Each image decoded and drawn on a canvas: how many of its pixels are not blank.
// Synchronous, at the load event (every image is loaded by then): --dump-dom does not wait
// for promises, and on a loaded machine an awaited decode() came after the dump.
window.addEventListener("load", () => {
  const counts = [];
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) { counts.push(-1); continue; }
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(img, 0, 0);
    const d = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let drawn = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i + 3] > 0 && (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250)) drawn++;
    }
    counts.push(drawn);
  }
  document.body.setAttribute("data-drawn-pixels", counts.join(","));
});
</script>"""


def browser() -> str | None:
    """$DIFFTRAIN_TEST_BROWSER (e.g. a Playwright-installed chrome), else one on PATH."""
    named = os.environ.get("DIFFTRAIN_TEST_BROWSER")
    if named:
        return shutil.which(named)
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def run_browser(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=5000", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(
    browser() is None,
    reason="no headless Chromium here (install it with `apt-get install -y chromium`, or set "
    "DIFFTRAIN_TEST_BROWSER to a Chrome/Chromium binary)",
)
def test_a_headless_browser_renders_the_page_offline(reported_run: dict, tmp_path: Path) -> None:
    run, exe = reported_run["run"], browser()
    html = (run / "report.html").read_text(encoding="utf-8")
    images = html.count("<img ")
    # A copy with a probe that draws each image as the browser decoded it, read back from
    # the DOM: every image, plots and grids, must have drawn pixels.
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    result = run_browser(exe, tmp_path / "profile", "--dump-dom", probe.as_uri())
    dom = Page(result.stdout)
    body = next(a for t, a in dom.tags if t == "body")
    drawn = [int(n) for n in body["data-drawn-pixels"].split(",")]
    assert len(drawn) == images >= len(PLOT_NAMES) + 2
    assert all(n > 100 for n in drawn), drawn

    # The page itself, as a screenshot: the loss curve's colour (matplotlib's C0) is there.
    shot = tmp_path / "shot.png"
    run_browser(
        exe, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1100,2400",
        "--hide-scrollbars", (run / "report.html").as_uri(),
    )  # fmt: skip
    image = Image.open(shot)
    assert image.size == (1100, 2400) and curve_pixels(image) > 200


# --- synthetic run folders -------------------------------------------------------------------


def png(path: Path, size: tuple[int, int], color: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def metrics_line(step: int, loss: object, **extra) -> str:
    record = {"step": step, "loss": loss, "lr": 1e-4 * step, "grad_norm": 1.0 + step,
              "epoch": step / 4, "skipped": False, "nonfinite_total": 0,
              "step_time_s": 0.5, "elapsed_s": 0.5 * step, **extra}  # fmt: skip
    return json.dumps(record)


def run_folder(path: Path) -> Path:
    """A new folder with the marker every folder training claims gets (and no lock file:
    a run copied without it)."""
    path.mkdir()
    (path / RUN_MARKER).write_text('{"difftrain": "0.1.0"}\n', encoding="utf-8")
    return path


@pytest.fixture
def synthetic_run(tmp_path: Path) -> Path:
    """A run folder as a resumed, bucketed run with bad images leaves it (no training)."""
    run = run_folder(tmp_path / "run")
    (run / "config.yaml").write_text(
        "model: {pretrained: builtin:tiny}\nvalidation:\n  prompts: ['<b>bold</b>']\n",
        encoding="utf-8",
    )
    lines = [metrics_line(s, 1.0 / s) for s in range(1, 5)]
    lines.append(metrics_line(3, 0.9, val_loss=0.5))  # the resumed run's step 3 replaces it
    lines.append(metrics_line(5, "nan", skipped=True, nonfinite_total=1, grad_norm=None))
    lines.append(metrics_line(6, 0.2, nonfinite_total=1, val_loss=0.6))
    lines.append('{"step": 7, "loss": 0.1')  # torn by a kill
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifest = {
        "format": 1,
        "sources": [
            {"kind": "folder", "id": "/data/<cats>", "repeats": 2, "files": 2},
            {"kind": "dataset", "id": "user/dogs", "repeats": 1, "files": 1},
        ],
        "files": [
            {"path": f"/data/<cats>/{i}.png", "size": 10, "sha256": "0" * 64, "source": 0}
            for i in range(2)
        ]
        + [{"path": "user/dogs[0]", "size": 10, "sha256": "1" * 64, "source": 1}],
    }
    (run / "data_manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    buckets = {"buckets": {"64x64": 2, "96x48": 1}, "block": 2, "images_per_epoch": 2,
               "unused": ["96x48"]}  # fmt: skip
    (run / "buckets.json").write_text(json.dumps(buckets), encoding="utf-8")
    (run / "skipped_images.txt").write_text(
        "/data/<img src=http://x.test/a.png>.png\tcannot identify image file\n", encoding="utf-8"
    )
    timings = {"startup_s": 4.0, "training_s": 15.0, "saving_s": 1.0, "total_s": 20.0}
    (run / "timings.json").write_text(json.dumps(timings), encoding="utf-8")
    for step, color in ((10, "red"), (2, "green"), (9, "blue")):
        png(run / "samples" / f"step-{step}.png", (64, 32), color)
    png(run / "samples" / "step-x.png", (8, 8), "white")  # not a grid name: ignored
    (run / "checkpoint-6").mkdir()
    (run / "checkpoint-6" / "manifest.json").write_text("{}", encoding="utf-8")
    (run / "checkpoint-6" / "weights.bin").write_bytes(b"w" * 3000)
    (run / "checkpoint-4").mkdir()  # interrupted: no manifest
    return run


def test_synthetic_run_data_buckets_skipped_timings_and_resume(synthetic_run: Path, capsys) -> None:
    code, out, err = report(capsys, synthetic_run)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"wrote {synthetic_run / 'report.html'}"
    assert "model card: no README.md yet" in out  # training has not finished: no card
    assert not (synthetic_run / "README.md").exists()
    text = (synthetic_run / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    assert_self_contained(page)
    assert "<img src=http" not in text and "<b>bold" not in text

    assert page.ids("grid-step-") == ["grid-step-2", "grid-step-9", "grid-step-10"]
    assert page.list_items == ["<b>bold</b>"]
    # One row per step; step 3 as the resumed run rewrote it; the torn line ignored.
    assert page.keyed["Steps recorded"] == "6 (steps 1 to 6)"
    assert page.keyed["metrics.jsonl lines ignored"] == "1"
    assert page.keyed["Skipped updates"] == "1"
    assert page.keyed["Non-finite losses"] == "1"
    assert page.keyed["Final validation loss"] == "0.6 (step 6)"
    assert page.keyed["Lowest validation loss"] == "0.5 (step 3)"  # the rewritten step 3
    assert "1 non-finite values not drawn (steps 5)" in page.texts["plot-loss"]

    data = page.texts["data"]
    assert page.keyed["images"] == "3"
    assert "folder/data/<cats>22" in data and "datasetuser/dogs11" in data
    assert "64x642" in data and "96x481never trains" in data
    assert "Skipped images: 1" in data and "/data/<img src=http://x.test/a.png>.png" in data

    timings = page.texts["timings"]
    for part, seconds, share in (("Start-up", 4, 20), ("Training", 15, 75), ("Saving", 1, 5)):
        assert f"{part}{seconds}{share:.1f} %" in timings
    checkpoints = page.texts["checkpoints"]
    assert "checkpoint-44" in checkpoints and "no (no manifest.json)" in checkpoints
    assert f"checkpoint-66{human_size(3002)}yes" in checkpoints


def test_a_plot_without_data_says_so_and_older_runs_lack_files(tmp_path: Path, capsys) -> None:
    run = run_folder(tmp_path / "old-run")
    lines = [metrics_line(s, 0.5, grad_norm=None) for s in (1, 2)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (run / "README.md").write_text("# old-run\n\nA card.", encoding="utf-8")  # no final newline
    png(run / "report" / "val_loss.png", (10, 10), "red")  # left by an earlier report
    assert report(capsys, run)[0] == 0
    page = read_page(run)
    for name in ("grad_norm", "val_loss"):
        assert f"plot-{name}" not in page.figure_imgs
        assert not (run / "report" / f"{name}.png").exists()
    assert "No validation loss recorded" in page.texts["plot-val_loss"]
    assert "No gradient norm recorded" in page.texts["plot-grad_norm"]
    assert "not recorded (no timings.json)" in page.texts["timings"]
    assert "Images: not recorded (no data_manifest.json" in page.texts["data"]
    assert "not recorded (no config.yaml)" in page.texts["config"]
    assert "not recorded (no env.json)" in page.texts["environment"]
    card = (run / "README.md").read_text(encoding="utf-8")
    assert card.startswith("# old-run\n\nA card.\n\n" + BEGIN)
    assert "(report/loss.png)" in card and "(report/val_loss.png)" not in card
    assert "- Validation loss: No validation loss recorded" in card


def test_config_only_folder_is_a_run_without_steps(tmp_path: Path, capsys) -> None:
    # `difftrain validate-config --output-dir` writes config.yaml and env.json, no metrics.
    run = run_folder(tmp_path / "validated")
    (run / "config.yaml").write_text("train: {max_steps: 3}\n", encoding="utf-8")
    assert report(capsys, run)[0] == 0
    page = read_page(run)
    assert page.keyed["Steps recorded"] == "none (no metrics.jsonl lines)"
    assert "No training loss recorded." in page.texts["plot-loss"]


def test_a_run_folder_is_what_training_says_it_is(tmp_path: Path) -> None:
    # One rule (difftrain.run_folder) for training and the report, which must not import
    # torch: the report's folders are the ones training would treat as runs.
    from difftrain.report import run_facts
    from difftrain.training import run_dir

    assert run_facts.records_a_run is run_dir.records_a_run
    assert run_facts.RUN_MARKER == RUN_MARKER
    env = {"packages": {"difftrain": "0.1.0"}}
    folders = {  # name: (files, a run?)
        "marker": ({RUN_MARKER: "{}"}, True),
        "0.1": ({"config.yaml": "train: {}\n", "env.json": json.dumps(env)}, True),
        "config only": ({"config.yaml": "train: {}\n"}, False),
        "other env": ({"config.yaml": "x: 1\n", "env.json": '{"packages": {"torch": "2"}}'}, False),
        "env a list": ({"config.yaml": "x: 1\n", "env.json": "[1]"}, False),
        "packages a number": ({"config.yaml": "x: 1\n", "env.json": '{"packages": 5}'}, False),
        "empty": ({}, False),
    }
    for name, (files, is_run) in folders.items():
        folder = tmp_path / name
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text, encoding="utf-8")
        assert run_facts.records_a_run(folder) == is_run, name


def test_a_report_leaves_no_lock_file_where_there_was_none(synthetic_run: Path, capsys) -> None:
    (synthetic_run / "README.md").write_text("# run\n", encoding="utf-8")  # the card: locked
    code, out, _ = report(capsys, synthetic_run)
    assert code == 0 and "model card: linked from" in out
    assert not (synthetic_run / LOCK_FILE).exists()


def test_every_file_is_written_by_the_atomic_writer(
    synthetic_run: Path, monkeypatch, capsys
) -> None:
    # io.atomic_write_bytes syncs a file to disk before renaming it into place: the plots
    # too, not only the page and the card.
    import difftrain.io

    synced = []
    real_replace = os.replace

    def replace(source, target) -> None:
        synced.append(Path(target).relative_to(synthetic_run).as_posix())
        real_replace(source, target)

    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(difftrain.io.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    monkeypatch.setattr(difftrain.io.os, "replace", replace)
    (synthetic_run / "README.md").write_text("# run\n", encoding="utf-8")
    assert report(capsys, synthetic_run)[0] == 0
    plots = sorted(p.relative_to(synthetic_run).as_posix() for p in synthetic_run.glob("report/*"))
    assert len(plots) == 4 and sorted(synced) == sorted([*plots, "report.html", "README.md"])
    assert len(fsyncs) == len(synced)


def test_odd_shaped_optional_files_are_listed_and_ignored(synthetic_run: Path, capsys) -> None:
    odd = {
        "buckets.json": ({"unused": 5}, "not a bucket table"),
        "data_manifest.json": ({"sources": 5, "files": []}, "not a data manifest"),
        "env.json": ([1, 2], "not a JSON object"),
    }
    for name, (data, _) in odd.items():
        (synthetic_run / name).write_text(json.dumps(data), encoding="utf-8")
    (synthetic_run / "timings.json").write_text('{"total_s": 1' + "0" * 400 + "}")  # > a float
    (synthetic_run / "config.yaml").write_text("- a list\n- of things\n", encoding="utf-8")
    code, _, err = report(capsys, synthetic_run)
    assert (code, err) == (0, "")
    page = read_page(synthetic_run)
    listed = page.texts["problems"]
    for name, (_, why) in odd.items():
        assert f"{name}: {why}" in listed and "; ignored" in listed
    assert "config.yaml: not a mapping of settings (shown as it is)" in listed
    assert "Buckets: not recorded (buckets.json: not a bucket table" in page.texts["data"]
    assert "Images: not recorded (data_manifest.json: not a data manifest" in page.texts["data"]
    assert "not recorded (env.json: not a JSON object; ignored)" in page.texts["environment"]
    assert page.texts["config-yaml"] == "- a list\n- of things\n"
    assert "Total" in page.texts["timings"]


def test_a_plot_that_cannot_be_drawn_says_so(synthetic_run: Path, capsys) -> None:
    lines = [metrics_line(1, 1e308), metrics_line(2, -1e308), metrics_line(3, 0.5)]
    (synthetic_run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (synthetic_run / "README.md").write_text("# run\n", encoding="utf-8")
    png(synthetic_run / "report" / "loss.png", (10, 10), "red")  # left by an earlier report
    code, _, err = report(capsys, synthetic_run)
    assert (code, err) == (0, "")
    page = read_page(synthetic_run)
    assert "plot-loss" not in page.figure_imgs
    assert "Not drawn: the values or steps are out of the range" in page.texts["plot-loss"]
    assert not (synthetic_run / "report" / "loss.png").exists()
    assert "plot-lr" in page.figure_imgs  # the other curves are drawn
    card = (synthetic_run / "README.md").read_text(encoding="utf-8")
    assert "- Training loss: Not drawn" in card and "(report/loss.png)" not in card

    # A step beyond a float breaks the shared x axis: every plot says so, none raises.
    lines.append(json.dumps({"step": 10**400, "loss": 0.5, "lr": 1e-4, "grad_norm": 1.0}))
    (synthetic_run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = report(capsys, synthetic_run)
    assert (code, err) == (0, "")
    page = read_page(synthetic_run)
    for name in PLOT_NAMES[:3]:
        assert "Not drawn" in page.texts[f"plot-{name}"], name


def test_run_report_imports_no_torch(synthetic_run: Path) -> None:
    code = (
        "import sys\nfrom difftrain.cli import main\n"
        f"rc = main(['report', {str(synthetic_run)!r}])\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print('RC', rc, 'HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "RC 0 HEAVY []" in result.stdout, result.stderr


def test_smoothing_is_a_debiased_ema() -> None:
    from difftrain.report.plots import ema, smoothing_factor

    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0
    smoothed = ema([1.0, 0.0], 0.5)
    assert smoothed[1] == pytest.approx((0.5 * 0.5 * 1.0) / (1 - 0.25))
    assert smoothing_factor(10) == 0.6 and smoothing_factor(10**6) == 0.99
    assert 0.6 < smoothing_factor(1000) < 0.99 and not math.isnan(smoothing_factor(0))


def test_quickstart_ends_with_the_report(tmp_path: Path, capsys, tiny_model_dir) -> None:
    code = main(["quickstart", "--output-dir", str(tmp_path / "q"), "--steps", "2"])
    out = capsys.readouterr().out
    html = tmp_path / "q" / "run" / "report.html"
    assert code == 0 and f"  run report:       {html}" in out.splitlines()
    page = read_page(html.parent)
    for name in PLOT_NAMES:  # the quick start records a validation loss too
        assert Image.open(io.BytesIO(decoded(page.figure_imgs[f"plot-{name}"]))).width > 0
    assert page.ids("grid-step-") == ["grid-step-2"]


def test_quickstart_without_matplotlib_names_the_install(synthetic_run: Path, monkeypatch) -> None:
    from difftrain.quickstart import quickstart_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    line = quickstart_report(synthetic_run)
    assert line.startswith("not written: ") and "pip install matplotlib" in line
    assert not (synthetic_run / "report.html").exists()
