"""DemoFusion under ControlNets: every UNet view gets its part of the condition image, as the official DemoFusion
ControlNet pipeline (PRIS-CV/DemoFusion, pipeline_demofusion_sdxl_controlnet.py) cuts it.

- Phase 1: the condition image at phase 1's pixel size, 8 x its latent size (the official resizes it to
  (W // S, H // S) rounded down to a multiple of 8, which is the same), RGB in [0, 1]; the ControlNet gets
  exactly the UNet's scaled input, context, pooled embedding and time ids, both CFG rows the same image.
- Scale s >= 2: the condition is upsampled from the previous scale's condition tensor (chained, bicubic,
  align_corners False, no clamp) to 8 x scale s's latent size (`upsample`).
- A local window (`window_condition`): the condition zero-padded by 8 x the margin on every side and cropped at
  8 x the window's latent box, the frame of the window's micro-conditioning crop.
- Dilated view (i, j) of s x s (`dilated_condition`): the condition zero-padded at the top/left by 8 x the
  latents' own pad and at the bottom/right by 8i / 8j, then every s-th pixel from row 8i and column 8j. Only the
  latents are blurred, never the condition.
- Strength: controlnet_conditioning_scale x keep(k), keep = 0 outside [start, end) of the scale's steps
  (`keep`); every scale repeats the pattern. A ControlNet with weight 0 is not run (it would add zeros).
- Several ControlNets: each with its image, scale, start and end; their residuals add up (diffusers'
  MultiControlNetModel).
- Guess mode: the ControlNet sees only the text-conditioned rows, its residuals weighted 0.1 .. 1.0 from the
  shallowest skip to the middle block, and the unconditioned rows get none. Without classifier-free guidance
  (guidance scale at most 1: text rows only) every row is a text row.
- Strength over a scale of fewer steps (strength < 1): start and end are fractions of the steps the scale runs,
  as diffusers' img2img ControlNet pipelines count them.

Where the official crashes, this does what it means:
- A scale whose pixel size is not a multiple of 8 (e.g. 2048 x 3072 on SDXL: scale 2 is 1365 x 2048 px, 170
  latent rows). The official upsamples the condition to 1365 rows; a dilated view then takes
  ceil(1365 / 2) = 683 rows, which the ControlNet's three stride-2 convs turn into 86 rows against the latents'
  85, and the addition fails. Here the condition is upsampled to 8 x the latent size, 1360 rows, at every scale:
  the latents at that scale decode to exactly 1360 rows showing the whole picture, so this is the condition
  image laid over the latents cell for cell (8 x 8 pixels per latent), where 1365 rows would have shifted the
  condition against them by up to 5 px towards the bottom edge. Where the pixel size is a multiple of 8 the two
  are the same numbers; at phase 1 the official rounds down to 8 x the latent size too.
- Guess mode after phase 1 (the official feeds 2n latent rows with n text rows there and fails): the text rows
  of every UNet call, at every scale.

`Control` is the object the sampler's seam (views.ViewRunner's `control`) calls once per UNet call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .demofusion import scale_sizes
from .encode import open_image
from .models.controlnet import ControlNet
from .views import Dilated, View, Whole, Window

Residuals = tuple[list[torch.Tensor], torch.Tensor]
CANNY_THRESHOLDS = (100, 200)  # the official demo's cv2.Canny(image, 100, 200)


def condition_size(latent_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of the condition image at a scale of that latent size: 8 pixels per latent."""
    return 8 * latent_size[0], 8 * latent_size[1]


def phase1_condition_size(height: int, width: int, base_px: int) -> tuple[int, int]:
    """(rows, columns) of the condition image a height x width run starts from (phase 1's pixel size)."""
    return condition_size(scale_sizes(height, width, base_px)[0])


def prepare_image(image: Image.Image | str | Path | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A condition image -> (1, 3, rows, columns) float32 in [0, 1] at size = (rows, columns).

    A picture (PIL image or path, read as --image reads pictures: EXIF rotation applied, 16-bit and palette
    pictures converted) is resized with Lanczos as diffusers' image processor does; a float tensor (1, 3, H, W)
    in [0, 1] is taken as it is, or resized nearest-neighbour as that processor resizes tensors. A picture
    already at that size is used as it is."""
    rows, cols = size
    if isinstance(image, torch.Tensor):
        if image.dim() != 4 or image.shape[:2] != (1, 3) or not image.is_floating_point():
            raise ValueError(f"a control image tensor must be float (1, 3, H, W), got {image.dtype} "
                             f"{tuple(image.shape)}")
        x = image.detach().to("cpu", torch.float32)
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError("a control image tensor must hold values in [0, 1]")
        return x if x.shape[-2:] == (rows, cols) else F.interpolate(x, size=(rows, cols))
    img = open_image(image)
    if img.size != (cols, rows):
        img = img.resize((cols, rows), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def upsample(condition: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The next scale's condition from this scale's: chained bicubic, as the official upsamples it per scale."""
    return F.interpolate(condition, size=condition_size(latent_size), mode="bicubic", align_corners=False)


def _take(x: torch.Tensor, dim: int, start: int, step: int, count: int) -> torch.Tensor:
    """Along dim (-2 or -1), the `count` entries start, start + step, ... of x extended by zeros on both
    sides: a crop of a zero-padded tensor without building the padded tensor."""
    n = x.shape[dim]
    first = min(count, max(0, -(start // step)))  # entries before index 0 (zeros)
    last = max(first, min(count, (n - 1 - start) // step + 1))  # entries from here on lie past the end (zeros)
    index = [slice(None)] * x.dim()
    index[dim] = slice(start + first * step, start + (last - 1) * step + 1, step) if last > first else slice(0, 0)
    pad = (first, count - last)
    return F.pad(x[tuple(index)], pad if dim == -1 else (0, 0, *pad))


def window_condition(condition: torch.Tensor, view: Window) -> torch.Tensor:
    """A local window's condition: the condition zero-padded by 8 x margin on every side, cropped at 8 x the
    window's latent box (the padded frame the window's crop micro-conditioning is given in)."""
    pad = 8 * view.margin
    x = _take(condition, -2, 8 * view.top - pad, 1, 8 * (view.bottom - view.top))
    return _take(x, -1, 8 * view.left - pad, 1, 8 * (view.right - view.left))


def dilated_condition(condition: torch.Tensor, view: Dilated) -> torch.Tensor:
    """Dilated view (i, j)'s condition: the condition zero-padded by 8 x pad_top / pad_left at the top / left and
    8i / 8j at the bottom / right, then rows 8i, 8i + s, ... and columns 8j, 8j + s, ... (the official
    F.pad(condition, (8 pad_left, 8j, 8 pad_top, 8i))[..., 8i::s, 8j::s])."""
    rows, cols = condition.shape[-2:]
    s = view.s
    x = _take(condition, -2, 8 * view.i - 8 * view.pad_top, s, -(-(rows + 8 * view.pad_top) // s))
    return _take(x, -1, 8 * view.j - 8 * view.pad_left, s, -(-(cols + 8 * view.pad_left) // s))


def view_condition(condition: torch.Tensor, view: View) -> torch.Tensor:
    if isinstance(view, Window):
        return window_condition(condition, view)
    if isinstance(view, Dilated):
        return dilated_condition(condition, view)
    if isinstance(view, Whole):
        return condition
    raise TypeError(f"no condition for a view of type {type(view).__name__}")


def keep(step: int, steps: int, start: float, end: float) -> float:
    """1 while the ControlNet acts at step index `step` of `steps`, else 0 (diffusers' controlnet_keep)."""
    return 1.0 - float(step / steps < start or (step + 1) / steps > end)


def _text_rows_only(r: torch.Tensor) -> torch.Tensor:
    # guess mode: the unconditioned rows (even, as views.ViewRunner interleaves them) get zero residuals
    out = r.new_zeros((2 * r.shape[0], *r.shape[1:]))
    out[1::2] = r
    return out


@dataclass(frozen=True)
class Unit:
    """One ControlNet with its condition image at phase 1's size, strength and active fraction of each scale."""
    net: ControlNet
    image: torch.Tensor  # (1, 3, 8h, 8w) in [0, 1], h x w phase 1's latent size
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


class Control:
    """ControlNet residuals for one UNet call of the sampler (views.ViewRunner's `control`).

    sizes: the latent size of every scale (demofusion.scale_sizes), which the condition is upsampled to;
    steps: denoising steps per scale. Each ControlNet's condition is kept for the scale in use only, in float32
    on the device the UNet calls run on, and made from the previous scale's when the sampler moves on."""

    def __init__(self, units: list[Unit], sizes: list[tuple[int, int]], steps: int, guess_mode: bool = False):
        self.units, self.sizes, self.steps, self.guess_mode = units, list(sizes), steps, guess_mode
        for u in units:
            if u.image.shape != (1, 3, *condition_size(self.sizes[0])):
                raise ValueError(f"the condition image is {tuple(u.image.shape)}, phase 1 needs "
                                 f"{(1, 3, *condition_size(self.sizes[0]))}")
        self._conditions: list[tuple[int, torch.Tensor]] = [(1, u.image.float()) for u in units]

    def condition(self, index: int, scale: int, device: torch.device) -> torch.Tensor:
        """ControlNet `index`'s condition at `scale` (1..S), chained up from phase 1's."""
        have, x = self._conditions[index]
        if have > scale:
            have, x = 1, self.units[index].image.float()
        x = x.to(device)
        while have < scale:
            have += 1
            x = upsample(x, self.sizes[have - 1])
        self._conditions[index] = (have, x)
        return x

    def __call__(self, x2: torch.Tensor, t2: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 time_ids: torch.Tensor, views: list[View], *, step: int, scale: int, steps: int | None = None,
                 halves: int = 2) -> Residuals | None:
        """x2 ... time_ids: the UNet call's inputs (each view twice, unconditioned then text-conditioned, or once,
        text-conditioned, with halves 1); views: the n views' geometry; step: index in the scale's `steps` (default:
        the run's steps); scale: 1..S. None when no ControlNet acts."""
        total: Residuals | None = None
        for index, u in enumerate(self.units):
            weight = u.scale * keep(step, steps or self.steps, u.start, u.end)
            if weight == 0:
                continue
            condition = self.condition(index, scale, x2.device)
            dtype = u.net.time_embed[0].weight.dtype
            # one crop per view, in the net's dtype: the net embeds it once for the view's two CFG rows
            hint = torch.cat([view_condition(condition, v).to(dtype) for v in views])
            if self.guess_mode and halves == 2:
                text = slice(1, None, 2)
                down, mid = u.net(x2[text], t2[text], context[text], pooled[text], time_ids[text], hint,
                                  scale=weight, guess_mode=True)
                down, mid = [_text_rows_only(r) for r in down], _text_rows_only(mid)
            else:
                down, mid = u.net(x2, t2, context, pooled, time_ids, hint, scale=weight, guess_mode=self.guess_mode)
            if total is None:
                total = (down, mid)
            else:
                total = ([a.add_(b) for a, b in zip(total[0], down)], total[1].add_(mid))
        return total


def _per_net(name: str, value, n: int) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{len(values)} values of {name} for {n} ControlNet(s)")
    return values


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def make_control(nets: list[ControlNet], images, scales=1.0, starts=0.0, ends=1.0, guess_mode: bool = False, *,
                 height: int, width: int, base_px: int, steps: int) -> Control:
    """The Control of a height x width run: one image, scale, start and end per ControlNet (a single value is
    used for all), checked (ValueError saying what is wrong) and the images read and sized for phase 1."""
    if not nets:
        raise ValueError("control_image needs a ControlNet: load the pipeline with controlnet=PATH")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) != len(nets):
        raise ValueError(f"{len(images)} control image(s) for {len(nets)} ControlNet(s): give one per ControlNet")
    scales = _per_net("controlnet_conditioning_scale", scales, len(nets))
    starts = _per_net("control_guidance_start", starts, len(nets))
    ends = _per_net("control_guidance_end", ends, len(nets))
    for s, a, b in zip(scales, starts, ends):
        if not _number(s):
            raise ValueError(f"controlnet_conditioning_scale {s!r} is invalid; it must be a finite number")
        if not (_number(a) and _number(b) and 0 <= a < b <= 1):
            raise ValueError(f"control_guidance_start {a!r} and control_guidance_end {b!r} are invalid; they must "
                             "be numbers with 0 <= start < end <= 1")
    if not isinstance(guess_mode, bool):
        raise ValueError(f"guess_mode {guess_mode!r} is invalid; it must be True or False")
    size = phase1_condition_size(height, width, base_px)
    units = [Unit(net, prepare_image(image, size), float(s), float(a), float(b))
             for net, image, s, a, b in zip(nets, images, scales, starts, ends)]
    guess_mode = guess_mode or any(net.control.global_pool for net in nets)  # as diffusers forces it
    return Control(units, scale_sizes(height, width, base_px), steps, guess_mode)


def canny(image: Image.Image | str | Path, size: tuple[int, int] | None = None,
          thresholds: tuple[int, int] = CANNY_THRESHOLDS) -> Image.Image:
    """Canny edges of a picture as a condition image, as the official demo makes it: the picture resized to
    size = (rows, columns) (bicubic, PIL's default filter the demo uses; None: as it is), cv2.Canny(rgb, 100,
    200) over its three channels (OpenCV takes the strongest channel's gradient), white edges on black in all
    three channels. Needs OpenCV (the `canny` extra: opencv-python-headless)."""
    try:
        import cv2
    except ImportError:
        raise ImportError("Canny edges need OpenCV: pip install 'minifusion[canny]' (or opencv-python-headless)"
                          ) from None
    img = open_image(image)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    edges = cv2.Canny(np.array(img), *thresholds)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))
