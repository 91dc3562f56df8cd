"""Render `report.html`: one self-contained page (images as data URIs, no script, no links
out), so it reads offline from a copied folder or an e-mail attachment.

    page = render_page(facts, plots)     # facts: run_facts.RunFacts, plots: [plots.Plot]

Every piece of text is escaped here, once (`esc`): captions, config values and paths come
from users, and a prompt like `<script>` must show as text.
"""

from __future__ import annotations

import base64
import json
import shlex
import struct
from datetime import datetime, timezone
from html import escape

import difftrain
from difftrain.report.markdown import human_size
from difftrain.report.plots import Plot
from difftrain.report.run_facts import RunFacts, number

MIN_GRID_WIDTH = 512  # px: smaller grids (the tiny test model's) are scaled up, pixel-sharp
MAX_LISTED = 200  # skipped images listed before "... and N more"
NOT_RECORDED = "not recorded"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; margin-top: 2em; }
.meta, figcaption, .note { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; }
img.pixelated { image-rendering: pixelated; }
pre { background: #f7f7f7; border: 1px solid #e3e3e3; padding: 0.8em; overflow-x: auto; }
.nodata { background: #fff8e1; border: 1px solid #f0d98c; padding: 0.6em; }
nav a { margin-right: 0.8em; }
"""


def esc(value: object) -> str:
    return escape(str(value), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_size(data: bytes) -> tuple[int, int] | None:
    # The IHDR chunk always comes first: width and height at bytes 16..24.
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return None


def table(header: tuple[str, ...], rows: list[tuple], numeric: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{esc(v)}</td>' if i in numeric else f"<td>{esc(v)}</td>"
            for i, v in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_table(rows: list[tuple[str, object]], table_id: str) -> str:
    """Two columns, each row tagged `data-key` so a reader (or a test) finds a value."""
    body = "".join(
        f'<tr data-key="{esc(key)}"><th>{esc(key)}</th><td>{esc(value)}</td></tr>'
        for key, value in rows
    )
    return f'<table id="{esc(table_id)}"><tbody>{body}</tbody></table>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def not_recorded(facts: RunFacts, name: str, absent: str) -> str:
    """The text `not recorded (why)`: the file is absent (`absent` says what that means), or
    was found but ignored (its problem, also listed at the top of the page)."""
    why = f"{name}: {facts.problems[name]}" if name in facts.problems else absent
    return f"{NOT_RECORDED} ({why})"


def fmt(value: object, digits: int = 6) -> str:
    as_number = number(value)
    if as_number is None:
        return "-" if value is None else str(value)
    return f"{as_number:.{digits}g}"


# --- sections --------------------------------------------------------------------------------


def summary_rows(facts: RunFacts) -> list[tuple[str, object]]:
    config, rows = facts.config or {}, facts.metrics.rows
    model, lora = config.get("model") or {}, config.get("lora") or {}
    kind = "LoRA" if isinstance(lora, dict) and lora.get("enabled") else "full fine-tune"
    out: list[tuple[str, object]] = [
        ("Run folder", facts.run_dir.resolve()),
        ("Base model", model.get("pretrained", NOT_RECORDED) if isinstance(model, dict) else "-"),
        ("Training", kind if config else NOT_RECORDED),
    ]
    if not rows:
        return [*out, ("Steps recorded", "none (no metrics.jsonl lines)")]
    last = rows[-1]
    val_steps, val_values, _ = facts.metrics.series("val_loss")
    step_times = [t for r in rows if (t := number(r.get("step_time_s"))) is not None]
    out += [
        ("Steps recorded", f"{len(rows)} (steps {rows[0]['step']} to {last['step']})"),
        ("Final loss", fmt(last.get("loss"))),
        ("Epochs", fmt(last.get("epoch"), 4)),
        ("Skipped updates", sum(1 for r in rows if r.get("skipped") is True)),
        ("Non-finite losses", fmt(last.get("nonfinite_total", 0))),
        ("Mean step time (s)", fmt(sum(step_times) / len(step_times), 4) if step_times else "-"),
        ("Training time by metrics.jsonl (s)", fmt(last.get("elapsed_s"), 6)),
    ]
    if val_values:
        best = min(range(len(val_values)), key=val_values.__getitem__)
        out += [
            ("Final validation loss", f"{fmt(val_values[-1])} (step {val_steps[-1]})"),
            ("Lowest validation loss", f"{fmt(val_values[best])} (step {val_steps[best]})"),
        ]
    if facts.metrics.ignored_lines:
        out.append(("metrics.jsonl lines ignored", facts.metrics.ignored_lines))
    return out


def plots_section(plots: list[Plot]) -> str:
    parts = []
    for plot in plots:
        if plot.png is None:
            parts.append(
                f'<h3>{esc(plot.title)}</h3><p class="nodata" id="plot-{esc(plot.name)}">'
                f"{esc(plot.note)}</p>"
            )
            continue
        parts.append(
            f'<figure id="plot-{esc(plot.name)}"><img src="{data_uri(plot.png)}" '
            f'alt="{esc(plot.title)}"><figcaption>{esc(plot.note)} File: '
            f'<a href="{esc(plot.link)}">{esc(plot.link)}</a></figcaption></figure>'
        )
    return section("plots", "Training curves", "\n".join(parts))


def grid_img(data: bytes, alt: str) -> str:
    size = png_size(data)
    if size and 0 < size[0] < MIN_GRID_WIDTH:
        width = size[0] * -(-MIN_GRID_WIDTH // size[0])
        return f'<img class="pixelated" src="{data_uri(data)}" alt="{esc(alt)}" width="{width}">'
    return f'<img src="{data_uri(data)}" alt="{esc(alt)}">'


def samples_section(facts: RunFacts) -> str:
    prompts = facts.prompts()
    if not facts.grids:
        return section(
            "samples", "Validation samples",
            '<p class="nodata">No validation grids (samples/step-N.png); set validation.prompts '
            "to render some.</p>",
        )  # fmt: skip
    listed = "".join(f"<li>{esc(p)}</li>" for p in prompts)
    intro = f"<p>Prompts, left to right, top to bottom:</p><ol>{listed}</ol>" if prompts else ""
    figures = []
    for step, path in facts.grids:
        try:
            data = path.read_bytes()
        except OSError as exc:
            figures.append(f'<p class="nodata">{esc(path.name)}: unreadable ({esc(exc)})</p>')
            continue
        figures.append(
            f'<figure class="grid" id="grid-step-{step}" data-step="{step}">'
            f"{grid_img(data, f'validation samples at step {step}')}"
            f"<figcaption>Step {step}: samples/{esc(path.name)}</figcaption></figure>"
        )
    return section("samples", "Validation samples", intro + "\n".join(figures))


def data_section(facts: RunFacts) -> str:
    parts = []
    manifest = facts.manifest
    if manifest is None:
        absent = "no data_manifest.json in this run"
        parts.append(f"<p>Images: {esc(not_recorded(facts, 'data_manifest.json', absent))}.</p>")
    else:  # run_facts.manifest_shape checked: a "files" list, "sources" a list of objects
        files, sources = manifest["files"], manifest.get("sources", [])
        parts.append(key_table([("images", len(files))], "data-summary"))
        rows = [
            (s.get("kind", "?"), s.get("id", "?"), s.get("repeats", 1), s.get("files", "?"))
            for s in sources
        ]
        parts.append(table(("Kind", "Source", "Repeats", "Images"), rows, numeric=(2, 3)))
    buckets = facts.buckets
    if buckets is None:
        note = "none (no buckets.json; data.buckets is off)"
        if "buckets.json" in facts.problems:
            note = not_recorded(facts, "buckets.json", "")
        parts.append(f"<p>Buckets: {esc(note)}.</p>")
    else:  # run_facts.buckets_shape checked: "buckets" name -> count, "unused" names
        counts, unused = buckets["buckets"], set(buckets.get("unused", []))
        rows = [
            (name, count, "never trains (fewer images than a batch)" if name in unused else "")
            for name, count in counts.items()
        ]
        parts.append("<h3>Aspect-ratio buckets</h3>")
        parts.append(table(("Bucket (W x H)", "Images", "Note"), rows, numeric=(1,)))
    skipped = facts.skipped
    if "skipped_images.txt" in facts.problems:
        parts.append(
            f"<p>Skipped images: {esc(not_recorded(facts, 'skipped_images.txt', ''))}.</p>"
        )
    elif not skipped:
        parts.append("<p>Skipped images: none.</p>")
    else:
        parts.append(f"<h3>Skipped images: {len(skipped)}</h3>")
        parts.append(table(("File", "Reason"), skipped[:MAX_LISTED]))
        if len(skipped) > MAX_LISTED:
            parts.append(f"<p>... and {len(skipped) - MAX_LISTED} more in skipped_images.txt.</p>")
    return section("data", "Data", "\n".join(parts))


def checkpoints_section(facts: RunFacts) -> str:
    if not facts.checkpoints:
        return section("checkpoints", "Checkpoints", "<p>No checkpoint-N folders.</p>")
    rows = [
        (c.path.name, c.step, human_size(c.size), "yes" if c.complete else "no (no manifest.json)")
        for c in facts.checkpoints
    ]
    total = human_size(sum(c.size for c in facts.checkpoints))
    return section(
        "checkpoints", "Checkpoints",
        table(("Folder", "Step", "Size", "Complete"), rows, numeric=(1, 2))
        + f"<p>{len(rows)} checkpoints, {esc(total)} in all.</p>",
    )  # fmt: skip


TIMING_PARTS = (("startup_s", "Start-up"), ("training_s", "Training"), ("saving_s", "Saving"))


def timings_section(facts: RunFacts) -> str:
    timings = facts.timings
    if timings is None:
        note = not_recorded(facts, "timings.json", "no timings.json")
        return section("timings", "Wall time", f"<p>{esc(note)}.</p>")
    total = number(timings.get("total_s"))
    rows = []
    for key, label in (*TIMING_PARTS, ("total_s", "Total")):
        seconds = number(timings.get(key))
        share = f"{100 * seconds / total:.1f} %" if seconds is not None and total else "-"
        rows.append((label, fmt(seconds, 6) if seconds is not None else NOT_RECORDED, share))
    note = (
        '<p class="note">Start-up: imports, checks, model loading and resume, up to the first '
        "step. Training: the steps with their checkpoints and validation. Saving: the final "
        "weights and the model card.</p>"
    )
    return section("timings", "Wall time", table(("Part", "Seconds", "Share"), rows, (1, 2)) + note)


def config_section(facts: RunFacts) -> str:
    if facts.config_text is None:
        note = not_recorded(facts, "config.yaml", "no config.yaml")
        return section("config", "Resolved config", f"<p>{esc(note)}.</p>")
    return section("config", "Resolved config (config.yaml)",
                   f'<pre id="config-yaml">{esc(facts.config_text)}</pre>')  # fmt: skip


def flatten(value: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        rows = []
        for key, item in value.items():
            rows += flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        rows = []
        for index, item in enumerate(value):
            rows += flatten(item, f"{prefix}[{index}]")
        return rows
    shown = value if isinstance(value, str) else json.dumps(value)
    return [(prefix, shown)]


def environment_section(facts: RunFacts) -> str:
    if facts.env is None:
        note = not_recorded(facts, "env.json", "no env.json")
        return section("environment", "Environment", f"<p>{esc(note)}.</p>")
    return section(
        "environment", "Environment (env.json)", key_table(flatten(facts.env), "environment")
    )


NAV = (
    ("summary", "Summary"), ("plots", "Curves"), ("samples", "Samples"), ("data", "Data"),
    ("checkpoints", "Checkpoints"), ("timings", "Wall time"), ("config", "Config"),
    ("environment", "Environment"),
)  # fmt: skip


def render_page(facts: RunFacts, plots: list[Plot]) -> str:
    name = facts.run_dir.resolve().name
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{anchor}">{esc(label)}</a>' for anchor, label in NAV)
    problems = "".join(f"<li>{esc(file)}: {esc(why)}</li>" for file, why in facts.problems.items())
    body = [
        f"<h1>Run report: {esc(name)}</h1>",
        f'<p class="meta">{esc(facts.run_dir.resolve())} · made by difftrain '
        f"{esc(difftrain.__version__)} on {made} · <code>difftrain report "
        f"{esc(shlex.quote(str(facts.run_dir)))}</code> makes it again</p>",
        f"<nav>{nav}</nav>",
        f'<section class="nodata" id="problems"><p>Files found but not read:</p>'
        f"<ul>{problems}</ul></section>"
        if problems
        else "",
        section("summary", "Summary", key_table(summary_rows(facts), "summary-table")),
        plots_section(plots),
        samples_section(facts),
        data_section(facts),
        checkpoints_section(facts),
        timings_section(facts),
        config_section(facts),
        environment_section(facts),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Run report: {esc(name)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body>\n</html>\n"
    )
