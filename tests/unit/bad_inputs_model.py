"""Bad-input cases for model folders and `difftrain sample`."""

from __future__ import annotations

from bad_input_table import Case, Workspace


def _missing_model(ws: Workspace) -> Case:
    config = ws.data_config("m", "model: {pretrained: ./no/model}\n")
    return Case(
        ["train", "--config", config, *ws.out], "model.pretrained: folder ./no/model does not exist"
    )


def _tiny_model_into_full_folder(ws: Workspace) -> Case:
    return Case(
        ["make-tiny-model", "--output-dir", str(ws.data)],
        "is not empty; choose a new or empty folder",
    )


CASES = {
    "model: missing folder": _missing_model,
    "make-tiny-model: into a full folder": _tiny_model_into_full_folder,
}
