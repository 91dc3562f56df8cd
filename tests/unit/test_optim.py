"""Optimizers (`train.optimizer`): torch's AdamW with the kernel it reports, bitsandbytes'
8-bit AdamW, Prodigy; the deprecated `train.use_8bit_adam` alias; state that survives a
checkpoint (`optimizer.pt`, read back weights-only)."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch

from difftrain.config import config_from_dict
from difftrain.config.schema import TrainConfig
from difftrain.errors import ConfigError, UserError
from difftrain.training.optim import adamw_implementation, build_optimizer, optimizer_name
from difftrain.training.state import OPTIMIZER_FILE, read_optimizer_state


def train_cfg(**train) -> TrainConfig:
    return config_from_dict({"data": {"train_dir": "images"}, "train": train}).train


def small_model(seed: int = 0) -> torch.nn.Module:
    """A conv, a norm and a linear big enough (64 x 128 = 8192 values) for 8-bit state."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.GroupNorm(2, 8),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 128),
        torch.nn.SiLU(),
        torch.nn.Linear(128, 64),
    )


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 4, 4, generator=generator), torch.randn(16, 64, generator=generator)


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    """`steps` full-batch steps on one fixed regression problem; the loss before each."""
    x, y = batch()
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def round_trip(optimizer: torch.optim.Optimizer, folder: Path) -> dict:
    """The optimizer's state as a checkpoint writes it and a resume reads it back."""
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    return read_optimizer_state(folder)


def assert_resumes_the_same(cfg: TrainConfig, tmp_path: Path, steps: int = 3) -> None:
    """Train, checkpoint, load into a fresh copy: both continue to the same weights."""
    model = small_model()
    optimizer = build_optimizer(cfg, model.parameters())
    fit(model, optimizer, steps)
    state = round_trip(optimizer, tmp_path)
    resumed = copy.deepcopy(model)
    resumed_optimizer = build_optimizer(cfg, resumed.parameters())
    resumed_optimizer.load_state_dict(state)
    fit(model, optimizer, steps)
    fit(resumed, resumed_optimizer, steps)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- the key and its deprecated alias -------------------------------------------------------


def test_optimizer_defaults_to_adamw_and_names_the_choices() -> None:
    assert train_cfg().optimizer == "adamw"
    assert optimizer_name(train_cfg(optimizer="prodigy")) == "prodigy"
    with pytest.raises(ConfigError, match=r"train.optimizer: must be one of adamw, adamw_8bit, "):
        train_cfg(optimizer="adam8bit")


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_use_8bit_adam_is_an_alias_of_adamw_8bit(optimizer: str) -> None:
    assert optimizer_name(train_cfg(use_8bit_adam=True, optimizer=optimizer)) == "adamw_8bit"
    assert optimizer_name(train_cfg(use_8bit_adam=False)) == "adamw"


def test_use_8bit_adam_beside_another_optimizer_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        build_optimizer(
            train_cfg(use_8bit_adam=True, optimizer="prodigy"), small_model().parameters()
        )
    message = str(caught.value)
    assert message.startswith("train.use_8bit_adam: ")
    assert "train.optimizer is prodigy" in message and "\n" not in message


# --- adamw ------------------------------------------------------------------------------------


def test_adamw_uses_the_fused_kernel_and_says_so() -> None:
    from difftrain.training.optim import describe_optimizer

    params = list(small_model().parameters())
    assert adamw_implementation(params) == "fused"  # float tensors on the CPU (torch >= 2.4)
    optimizer = build_optimizer(train_cfg(), params)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["fused"] is True
    # Said in the run's "training N steps ..." line (test_training checks the line).
    assert describe_optimizer(optimizer) == "torch AdamW (fused)"


def test_adamw_falls_back_to_foreach_where_fused_cannot_run() -> None:
    floats = list(small_model().parameters())
    complex_param = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    assert adamw_implementation([*floats, complex_param]) == "foreach"
    # fp16's grad scaler must see a skipped step as skipped: the fused kernel hides it.
    assert adamw_implementation(floats, grad_scaler=True) == "foreach"
    optimizer = build_optimizer(train_cfg(mixed_precision="fp16"), floats)
    assert optimizer.param_groups[0]["foreach"] is True
    assert not optimizer.param_groups[0]["fused"]


def test_under_fp16_an_overflowed_step_is_still_seen_as_skipped() -> None:
    """accelerate reports a skipped step when the grad scaler does not call `step`; a fused
    optimizer's step is always called (it skips inside the kernel), so fp16 gets foreach."""
    model = small_model()
    optimizer = build_optimizer(train_cfg(mixed_precision="fp16"), model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    calls = []
    real_step = optimizer.step
    optimizer.step = lambda *args, **kwargs: calls.append(1) or real_step(*args, **kwargs)
    x, _ = batch()
    scaler.scale(model(x).sum() * float("inf")).backward()
    scaler.step(optimizer)
    assert not calls


@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])  # fused, foreach
def test_adamw_steps_match_the_for_loop_adamw(mixed_precision: str) -> None:
    cfg = train_cfg(
        learning_rate=1e-2, adam_beta1=0.8, adam_beta2=0.95, adam_weight_decay=0.1,
        adam_epsilon=1e-6, mixed_precision=mixed_precision,
    )  # fmt: skip
    model, reference = small_model(), small_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(cfg, model.parameters())
    plain = torch.optim.AdamW(
        reference.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, eps=1e-6,
        foreach=False, fused=False,
    )  # fmt: skip
    assert fit(model, optimizer, 5) == pytest.approx(fit(reference, plain, 5), rel=1e-5)
    for a, b, start in zip(model.parameters(), reference.parameters(), before, strict=True):
        assert not torch.equal(a, start)  # every tensor moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_adamw_state_survives_a_checkpoint(tmp_path: Path) -> None:
    assert_resumes_the_same(train_cfg(learning_rate=1e-2), tmp_path)


# --- adamw_8bit (bitsandbytes) ----------------------------------------------------------------


def test_adamw_8bit_trains_on_the_cpu_with_8bit_state(tmp_path: Path) -> None:
    bitsandbytes = pytest.importorskip("bitsandbytes")
    model = small_model()
    optimizer = build_optimizer(
        train_cfg(optimizer="adamw_8bit", learning_rate=1e-2), model.parameters()
    )
    assert isinstance(optimizer, bitsandbytes.optim.AdamW8bit)
    losses = fit(model, optimizer, 10)
    assert losses[-1] < 0.9 * losses[0]
    big = model[3].weight  # 8192 values: at least bitsandbytes' 4096 for 8-bit state
    assert optimizer.state[big]["state1"].dtype == torch.uint8
    assert optimizer.state[big]["state2"].dtype == torch.uint8
    assert_resumes_the_same(train_cfg(optimizer="adamw_8bit", learning_rate=1e-2), tmp_path)


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"optimizer": "adamw_8bit"}, "train.optimizer: adamw_8bit needs the bitsandbytes package"),
        ({"use_8bit_adam": True}, "train.use_8bit_adam: needs the bitsandbytes package"),
    ],
)
def test_adamw_8bit_without_bitsandbytes_is_one_clear_line(monkeypatch, train, message) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails
    with pytest.raises(UserError, match=message) as caught:
        build_optimizer(train_cfg(**train), small_model().parameters())
    assert "pip install bitsandbytes" in str(caught.value) and "\n" not in str(caught.value)


def test_adamw_8bit_from_a_bitsandbytes_without_cpu_kernels_says_it_needs_a_gpu(
    monkeypatch,
) -> None:
    bitsandbytes = pytest.importorskip("bitsandbytes")

    def no_cpu_kernel(self, closure=None):
        raise RuntimeError("cadam_8bit_blockwise_grad_fp32: symbol not found")

    monkeypatch.setattr(bitsandbytes.optim.AdamW8bit, "step", no_cpu_kernel)
    with pytest.raises(UserError, match="train.optimizer: adamw_8bit needs a CUDA GPU with this"):
        build_optimizer(train_cfg(optimizer="adamw_8bit"), small_model().parameters())


# --- prodigy ----------------------------------------------------------------------------------


def test_prodigy_trains_with_the_config_hyperparameters_and_survives_a_checkpoint(
    tmp_path: Path, caplog, capsys
) -> None:
    from prodigyopt import Prodigy

    cfg = train_cfg(
        optimizer="prodigy", learning_rate=1.0, adam_beta1=0.9, adam_beta2=0.99,
        adam_weight_decay=0.01, adam_epsilon=1e-7,
    )  # fmt: skip
    model = small_model()
    with caplog.at_level(logging.WARNING, logger="difftrain"):
        optimizer = build_optimizer(cfg, model.parameters())
    assert isinstance(optimizer, Prodigy)
    assert not caplog.records  # learning_rate 1.0: nothing to warn about
    assert capsys.readouterr().out == ""  # its "Using decoupled weight decay" print is kept in
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (
        1.0, (0.9, 0.99), 0.01, 1e-7,
    )  # fmt: skip
    assert group["use_bias_correction"] and group["safeguard_warmup"]
    losses = fit(model, optimizer, 40)  # its step size starts at d0 = 1e-6 and grows
    assert losses[-1] < 0.5 * losses[0]
    assert group["d"] > 100 * group["d0"]
    assert_resumes_the_same(cfg, tmp_path)


def test_prodigy_warns_about_an_adamw_sized_learning_rate(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="difftrain"):
        build_optimizer(train_cfg(optimizer="prodigy"), small_model().parameters())
    assert "set train.learning_rate: 1.0" in caplog.text


def test_prodigy_without_prodigyopt_is_one_clear_line(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(
        UserError, match=r"^train.optimizer: prodigy needs the prodigyopt package \(pip install"
    ):
        build_optimizer(train_cfg(optimizer="prodigy"), small_model().parameters())


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "prodigy"])
def test_optimizers_other_than_adamw_are_refused_with_fsdp(optimizer: str) -> None:
    from difftrain.config import config_from_dict

    with pytest.raises(ConfigError, match=f"train.optimizer: {optimizer} is not checked with"):
        config_from_dict(
            {"data": {"train_dir": "x"}, "train": {"optimizer": optimizer, "fsdp": True}}
        )
