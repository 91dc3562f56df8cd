"""The model folders and GPU-memory probes of gpu_throughput.py (imported by it; not run on
its own): random-weight SD-1.5 and SDXL layouts at full or tiny size, the denoiser's FLOPs per
step, and nvidia-smi's per-process memory polled in a thread."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

RESOLUTION, BATCH = {"sd15": 512, "sdxl": 1024}, {"sd15": 8, "sdxl": 4}

TEXT = {  # CLIP-L (SD's encoder, SDXL's first) and OpenCLIP bigG (SDXL's second), full depth
    "L": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"),
    "G": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, projection_dim=1280, hidden_act="gelu"),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, projection_dim=32),
}  # fmt: skip
SDXL_BLOCKS = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   use_linear_projection=True, addition_embed_type="text_time")  # fmt: skip
UNET = {  # the real configs (UNet2DConditionModel's default block types are SD-1.5's)
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, **SDXL_BLOCKS),
}  # fmt: skip
TINY_UNET = {  # the same layouts, tiny: cross = the text widths, 80 = 32 pooled + 6 ids x 8
    "sd15": dict(sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                 cross_attention_dim=32, attention_head_dim=8),
    "sdxl": dict(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1,
                 transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64,
                 attention_head_dim=(2, 4, 4), addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=80, **SDXL_BLOCKS),
}  # fmt: skip


# ---------------------------------------------------------------- the model folders


def build_model(name: str, tiny: bool, folder: Path) -> Path:
    """Random-weight pipeline `name` in `folder`, reused once complete (model_index.json)."""
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers
    import torch
    import transformers as tf

    from difftrain.io import atomic_directory
    from difftrain.models.tiny import builtin_model_path

    # The builtin's local tokenizers (no download) and its family's real noise schedule.
    base = builtin_model_path("tiny" if name == "sd15" else "tiny-sdxl")
    index = json.loads((base / "model_index.json").read_text(encoding="utf-8"))
    scheduler_class = getattr(diffusers, index["scheduler"][1])
    parts = {"scheduler": scheduler_class.from_pretrained(base, subfolder="scheduler")}
    names = ["tokenizer"] if name == "sd15" else ["tokenizer", "tokenizer_2"]
    parts.update((n, tf.CLIPTokenizer.from_pretrained(base, subfolder=n)) for n in names)
    tok, (clip_l, big_g) = parts["tokenizer"], ("tiny", "tiny") if tiny else ("L", "G")
    ids = dict(vocab_size=len(tok), max_position_embeddings=tok.model_max_length,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)  # fmt: skip
    # Random init of 2.6 B parameters takes minutes on a CPU, seconds on the GPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(0)
        parts["unet"] = diffusers.UNet2DConditionModel(**(TINY_UNET if tiny else UNET)[name])
        torch.manual_seed(1)
        parts["vae"] = diffusers.AutoencoderKL(
            block_out_channels=(32,) * 4 if tiny else (128, 256, 512, 512),
            layers_per_block=1 if tiny else 2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=64 if tiny else RESOLUTION[name],
            scaling_factor=0.18215 if name == "sd15" else 0.13025)  # fmt: skip
        torch.manual_seed(2)
        parts["text_encoder"] = tf.CLIPTextModel(tf.CLIPTextConfig(**TEXT[clip_l], **ids))
        if name == "sd15":
            pipeline = diffusers.StableDiffusionPipeline(
                **parts, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)  # fmt: skip
        else:
            torch.manual_seed(3)
            config = tf.CLIPTextConfig(**TEXT[big_g], **ids)
            parts["text_encoder_2"] = tf.CLIPTextModelWithProjection(config)
            pipeline = diffusers.StableDiffusionXLPipeline(**parts, add_watermarker=False)
    with atomic_directory(folder, keep_existing=True) as tmp:
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
        for n in names:  # the builtin's own files (vocab.json + merges.txt too)
            shutil.rmtree(tmp / n)
            shutil.copytree(base / n, tmp / n)
    del pipeline, parts
    free_memory()
    return folder


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def denoiser_flops(model_dir: Path, resolution: int, device, dtype) -> tuple[float, int]:
    """(FLOPs of one forward + backward of the UNet for one sample, its parameter count).

    Every op of the UNet works per sample, so a step's FLOPs are the batch times these.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to(device)
    config, side, tokens = unet.config, resolution // 8, 77  # CLIP's 77 tokens
    inputs = {"sample": torch.randn(1, config.in_channels, side, side, device=device),
              "timestep": torch.tensor([500], device=device),
              "encoder_hidden_states": torch.randn(1, tokens, config.cross_attention_dim,
                                                   device=device)}  # fmt: skip
    if config.addition_embed_type == "text_time":  # SDXL: pooled text + 6 size / crop ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        size_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]])
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, device=device),
                                       "time_ids": size_ids.float().to(device)}  # fmt: skip
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = unet(**inputs).sample
        out.float().square().mean().backward()
    flops, params = counter.get_total_flops(), sum(p.numel() for p in unet.parameters())
    del unet, out, inputs
    free_memory()
    return float(flops), params


# ---------------------------------------------------------------- GPU memory from nvidia-smi


def smi(query: str) -> list[list[float]] | None:
    """nvidia-smi's numeric rows for `query` ("[N/A]" rows left out); None without it."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split(",") for line in out.splitlines()]
    return [[float(c) for c in r] for r in rows if all(re.fullmatch(r" *[\d.]+ *", c) for c in r)]


def is_ours(pid: int, own: bool) -> bool:
    """`own`: this process; else one of its descendants (the peer, under accelerate launch)."""
    me = os.getpid()
    if pid == me or own:
        return pid == me and own
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: the ppid
        if pid == me:
            return True
    return False


class GpuMemoryPoll(threading.Thread):
    """Peak nvidia-smi used_memory of our processes, and of the whole GPU as a fallback: in a
    container with its own pid namespace nvidia-smi may list no process, or other pids."""

    def __init__(self, own: bool):
        super().__init__(daemon=True)
        self.own, self.done = own, threading.Event()
        self.ours_mib = self.gpu_before = self.gpu_peak = None

    def run(self) -> None:
        if not (before := smi("gpu=memory.used")):
            return
        self.gpu_before = self.gpu_peak = float(before[0][0])
        while not self.done.is_set():
            apps = smi("compute-apps=pid,used_memory") or []
            mine = [mib for pid, mib in apps if is_ours(int(pid), self.own)]
            if mine:
                self.ours_mib = max(self.ours_mib or 0.0, sum(mine))
            if gpu := smi("gpu=memory.used"):
                self.gpu_peak = max(self.gpu_peak, float(gpu[0][0]))
            self.done.wait(0.2)

    def gib(self) -> tuple[float | None, str]:
        """(GiB, mark): ours (""), else the whole GPU's rise during the run ("*")."""
        self.done.set()
        self.join(timeout=15)
        if self.ours_mib is not None:
            return self.ours_mib / 1024, ""
        if self.gpu_before is None:
            return None, ""  # no nvidia-smi (a CPU machine)
        return (self.gpu_peak - self.gpu_before) / 1024, "*"
