"""Component level, side by side in one process on the same weight tensors and the same inputs: our UNet, VAE
decoder and text encoders against diffusers' UNet2DConditionModel / AutoencoderKL and transformers'
CLIPTextModel(WithProjection), each called the way its pipeline calls it.

Time: median of `repeat` forwards after a warm-up, ours and theirs interleaved so that background load hits
both alike. Memory: on CUDA the allocator's peak over the resident weights; on a CPU the peak of live tensor
bytes one forward allocates (minifusion.memory.MemoryTracker, in a separate untimed forward) and the resident
set's growth. The maximum difference of the outputs is reported too: it shows the weights really are shared.
"""
from __future__ import annotations

import torch

from minifusion.decode import decode_tiled
from minifusion.memory import MemoryTracker

from .measure import PeakMemory, sync, time_calls
from .models import CONFIGS, random_models, reference_twins

# latent side of the UNet and VAE inputs, per config and device type
SIZES = {("tiny", "cpu"): (32, 16), ("tiny", "cuda"): (32, 32), ("sdxl", "cpu"): (64, 32), ("sdxl", "cuda"): (128, 128)}


def _calls(ours: dict, theirs: dict, cfgs, latent: int, vae_latent: int, device, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    ucfg = cfgs.unet
    # one view under classifier-free guidance: 2 samples
    x = torch.randn(2, ucfg.in_channels, latent, latent, generator=g).to(device, dtype)
    t = torch.full((2,), 501.0, device=device)
    ctx = torch.randn(2, 77, ucfg.context_dim, generator=g).to(device, dtype)
    pooled = torch.randn(2, ucfg.pooled_dim, generator=g).to(device, dtype)
    size = 8 * latent
    ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32, device=device)
    vdt = ours["vae"].post_quant_conv.weight.dtype
    z = torch.randn(1, cfgs.vae.latent_channels, vae_latent, vae_latent, generator=g).to(device, vdt)
    tokens = torch.randint(0, cfgs.text_encoder_1.vocab_size - 1, (2, 77), generator=g)
    tokens[:, 20] = cfgs.text_encoder_1.vocab_size - 1  # an end-of-text token for pooling
    tokens = tokens.to(device)

    def their_text(model):
        def call():
            out = model(tokens, output_hidden_states=True)  # as diffusers' SDXL pipeline: hidden_states[-2]
            return out.hidden_states[-2]
        return call

    return {
        "unet": (lambda: ours["unet"](x, t, ctx, pooled, ids),
                 lambda: theirs["unet"](x, t, encoder_hidden_states=ctx,
                                        added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample),
        "vae_decode": (lambda: ours["vae"].decode(z), lambda: theirs["vae"].decode(z).sample),
        "vae_decode_tiled": (lambda: decode_tiled(ours["vae"], z, storage=None),
                             lambda: theirs["vae"].decode(z).sample),
        "text_encoder_1": (lambda: ours["text_encoder_1"](tokens)[0], their_text(theirs["text_encoder_1"])),
        "text_encoder_2": (lambda: ours["text_encoder_2"](tokens)[0], their_text(theirs["text_encoder_2"])),
    }


def _memory(fn, device: torch.device, mem: PeakMemory) -> dict:
    mem.reset()
    fn()
    out = mem.read()
    if device.type != "cuda":
        with MemoryTracker() as tracker:
            fn()
        out["peak_tensor_bytes"] = tracker.peak
    return out


@torch.no_grad()
def run(config: str, device: torch.device, dtype: torch.dtype, repeat: int = 3, warmup: int = 1,
        only: tuple[str, ...] | None = None) -> dict:
    cfgs = CONFIGS[config]
    ours = random_models(cfgs, device, dtype)
    theirs = reference_twins(ours)
    latent, vae_latent = SIZES[(config, "cuda" if device.type == "cuda" else "cpu")]
    calls = _calls(ours, theirs, cfgs, latent, vae_latent, device, dtype)
    mem = PeakMemory(device)
    rows = []
    try:
        for name, (mine, ref) in calls.items():
            if only and name not in only:
                continue
            t = time_calls({"ours": mine, "theirs": ref}, device, warmup=warmup, repeat=repeat)
            a, b = mine(), ref()
            sync(device)
            m_ours, m_theirs = _memory(mine, device, mem), _memory(ref, device, mem)
            key = "peak_tensor_bytes" if device.type != "cuda" else "peak_allocated_growth_bytes"
            rows.append({
                "component": name, "output_shape": list(b.shape),
                "ours_seconds": t["ours"].median, "theirs_seconds": t["theirs"].median,
                "ours_all_seconds": t["ours"].seconds, "theirs_all_seconds": t["theirs"].seconds,
                "time_ratio_ours_over_theirs": t["ours"].median / t["theirs"].median,
                "speedup_theirs_over_ours": t["theirs"].median / t["ours"].median,
                "ours_memory": m_ours, "theirs_memory": m_theirs,
                "memory_ratio_ours_over_theirs": (m_ours[key] / m_theirs[key]) if m_theirs.get(key) else None,
                "max_abs_diff": (a.float() - b.float()).abs().max().item(),
                "output_scale": b.float().abs().max().item()})
    finally:
        mem.close()
    return {"config": config, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "unet_latent": latent, "vae_latent": vae_latent, "repeat": repeat, "rows": rows}
