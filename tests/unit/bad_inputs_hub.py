"""Bad-input cases for uploads to the Hugging Face Hub (`train.push_to_hub`, `hub.*`).

Each is refused before training and before the output folder exists. Offline mode and the
token are read by huggingface_hub at import, so those cases run in a child process whose
HF_HOME is an empty folder outside the workspace (never the user's own token or cache).
"""

from __future__ import annotations

from collections.abc import Callable

from bad_input_table import Case, Workspace

ONLINE = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}


def _push(ws: Workspace, name: str, hub: str) -> list[str]:
    extra = f"train: {{push_to_hub: true}}\nhub: {hub}\n"
    return ["train", "--config", ws.data_config(name, extra), *ws.out]


def _empty_hf_home(ws: Workspace) -> dict[str, str]:
    home = ws.root.parent / "hf-home-empty"  # outside the watched workspace
    home.mkdir(exist_ok=True)
    # No token from the environment either: an OIDC exchange (CI) would find one.
    return {"HF_HOME": str(home), "HF_TOKEN_PATH": str(home / "token"), "HF_OIDC_RESOURCE": ""}


def _no_repo_id(ws: Workspace) -> Case:
    return Case(
        _push(ws, "hub-no-repo", "{private: true}"),
        "train.push_to_hub: true needs hub.repo_id (the repository to upload to",
    )


def _bad_repo_id(ws: Workspace) -> Case:
    return Case(
        _push(ws, "hub-bad-repo", "{repo_id: 'me/two--dashes'}"),
        "hub.repo_id: 'me/two--dashes' is not a Hub repository id (",
    )


def _offline(ws: Workspace) -> Case:
    return Case(
        _push(ws, "hub-offline", "{repo_id: me/tiny}"),
        "train.push_to_hub: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so nothing can be "
        "uploaded; unset it",
        env={**_empty_hf_home(ws), "HF_TOKEN": "hf_fakeTokenForTheTest", "HF_HUB_OFFLINE": "1"},
    )


def _no_token(ws: Workspace) -> Case:
    return Case(
        _push(ws, "hub-no-token", "{repo_id: me/tiny}"),
        "train.push_to_hub: no Hugging Face token found; run `hf auth login` or set HF_TOKEN",
        # Empty means unset to huggingface_hub; the token file is looked for in the empty home.
        env={**_empty_hf_home(ws), **ONLINE, "HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": ""},
    )


def _checkpoints_without_push(ws: Workspace) -> Case:
    config = ws.data_config(
        "hub-checkpoints-only", "hub: {repo_id: me/tiny, push_checkpoints: true}\n"
    )
    return Case(
        ["train", "--config", config, *ws.out],
        "hub.push_checkpoints: true uploads checkpoints only with train.push_to_hub: true",
    )


CASES: dict[str, Callable[[Workspace], Case]] = {
    "hub_push_checkpoints_without_push_to_hub": _checkpoints_without_push,
    "hub_push_without_repo_id": _no_repo_id,
    "hub_repo_id_not_valid": _bad_repo_id,
    "hub_push_while_offline": _offline,
    "hub_push_without_token": _no_token,
}
