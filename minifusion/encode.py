"""Image input for image-to-image: read and convert a picture, size it, encode it exactly in tiles, sample.

`encode_tiled` is `vae.encode` with compute-device memory bounded by the tile, on the stage runner of
`minifusion.decode` (whole-map GroupNorm statistics, the mid attention over the whole latent map, halos of
exactly the receptive field, full maps kept on `storage`). The encoder's Downsample pads one zero row and
column at the bottom/right and convolves with stride 2 and no padding: its tiles are laid out on its output,
so output rows [y0, y1) read exactly input rows [2*y0, 2*y1 + 1), with no halo above and the padding row
only at the bottom edge; their side is tile/2 so the input read stays the tile's size.

`load_image` turns a file or PIL image into the (1, 3, h, w) tensor in [-1, 1] the encoder takes, with one
clear `ImageError` (a ValueError) for anything it cannot use; `base_scale_size` says which size to load it at.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from minifusion.config import VAEConfig
from minifusion.decode import TileShare, _Map, _run, _Stages, meta_flops
from minifusion.demofusion import scale_sizes
from minifusion.models.vae import VAE


def _encoder(run: _Stages, vae: VAE, x: _Map) -> _Map:
    """Encoder.forward then quant_conv, stage by stage."""
    enc = vae.encoder
    x = run.conv(x, enc.conv_in)
    for level in enc.down:
        for block in level.block:
            x = run.resblock(x, block)
        if hasattr(level, "downsample"):
            x = run.conv(x, level.downsample.conv, pad=(0, 1))  # Downsample.forward's F.pad(x, (0, 1, 0, 1))
    x = run.resblock(x, enc.mid.block_1)
    x = run.attention(x, enc.mid.attn_1)
    x = run.resblock(x, enc.mid.block_2)
    return run.conv(x, enc.conv_out, norm=enc.norm_out, after=vae.quant_conv, moments=False)


@torch.no_grad()
def encode_tiled(vae: VAE, images: torch.Tensor, tile: int = 256, storage: str | torch.device | None = "cpu",
                 progress: bool | Callable[[int, int], None] | None = None, share: TileShare | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, C, H//8, W//8), equal to `vae.encode(images)`.

    Computes on the VAE's device in its dtype. `tile`: tile side in pixels of each stage's own feature map.
    `storage`: device of the full-map buffers and of the results (None: the VAE's device).
    `progress`: True for a tqdm bar, or a callable(done, total) called after every tile.
    `share`: which tiles this process computes, as in decode_tiled.
    """
    mean, logvar = _run(_encoder, vae, images, tile, storage, progress, "VAE encode", share).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)  # as VAE.encode


def encode_flops(cfg: VAEConfig, shape: tuple[int, ...], tile: int | None = None) -> int:
    """FLOPs of encoding images of `shape` (B, 3, H, W): untiled (`tile=None`) or `encode_tiled` with that
    tile. Counted on the meta device: any size of any config costs no memory and no weights."""
    return meta_flops(cfg, shape, lambda vae, x: encode_tiled(vae, x, tile=tile, storage="meta") if tile
                      else vae.encode(x))


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw from the encoder's diagonal Gaussian, mean + std * eps: the same numbers as diffusers'
    `latent_dist.sample(generator)`, which draws eps in the latents' dtype on the generator's device (the
    latents' device without one) and then moves it. For the mode, use `mean`."""
    device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * eps


class ImageError(ValueError):
    """An image input that cannot be used; the message is one line naming the input and the problem."""


def open_image(image: Image.Image | str | Path, name: str | None = None) -> Image.Image:
    """A file or PIL image -> an 8-bit RGB PIL image, upright (EXIF orientation applied), else ImageError.
    `name`: what its messages call it (default: the path, or the image's file name)."""
    if isinstance(image, Image.Image):
        return _prepare(image, name or getattr(image, "filename", "") or "the image")
    if not isinstance(image, (str, Path)):
        raise TypeError(f"image must be a PIL image or a path, not {type(image).__name__}")
    name, path = name or str(image), Path(image)
    if path.is_file() and path.stat().st_size == 0:
        raise ImageError(f"{name}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; both are refused here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: the image is too large to open safely (over Image.MAX_IMAGE_PIXELS = "
                         f"{Image.MAX_IMAGE_PIXELS} pixels)") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except OSError as err:  # UnidentifiedImageError included
        raise ImageError(f"{name}: not a readable image ({type(err).__name__}: {err})") from None
    with img:
        return _prepare(img, name)


def _prepare(img: Image.Image, name: str) -> Image.Image:
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{name}: the image is empty ({img.width}x{img.height} pixels)")
    try:
        img.load()  # decoding is lazy: truncated or corrupt pixel data shows here
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{name}: the image data is truncated or corrupt ({type(err).__name__}: {err})") from None
    return _to_rgb(img, name)


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit greyscale (PNG's, which PIL opens as I;16 or I): PIL's own conversion to 8 bits clips at 255
        # instead of scaling, which would turn nearly every pixel white
        return _grey(np.asarray(img, dtype=np.float64) / 257.0)
    if img.mode == "F":
        return _grey(np.asarray(img, dtype=np.float64) * 255.0)  # float images hold 0..1 (as TIFF writers do)
    try:
        if img.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info:
            # the colour under a transparent pixel is arbitrary (often black); composite over white, what image
            # viewers and web pages show behind transparency, so the encoded picture is the one the user sees
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1, L, P, RGB: PIL's conversions
    except ValueError as err:
        raise ImageError(f"{name}: cannot convert image mode {img.mode} to RGB ({err})") from None


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")


def load_image(image: Image.Image | str | Path, height: int, width: int) -> torch.Tensor:
    """A file or PIL image -> (1, 3, height, width) float32 in [-1, 1], resized with Lanczos (which PIL
    widens by the scale factor when shrinking, so a downscale is antialiased). ImageError if unusable."""
    img = open_image(image)
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)[None]
    return x / 127.5 - 1.0


class Sizes(NamedTuple):
    final: tuple[int, int]  # (H, W) px of the last scale
    base: tuple[int, int]  # (h, w) px to load and encode the image at: 8 x phase 1's latent size


def base_scale_size(img_w: int, img_h: int, base: int, height: int | None = None,
                    width: int | None = None) -> Sizes:
    """The sizes of an image-to-image run for an img_w x img_h picture on a model native at `base` px.

    The final size keeps the picture's aspect: none given, the long side is 2 x base or, for a larger picture,
    its own long side rounded up to a multiple of base (an upscaler never returns less than it was given), and
    the short side follows, rounded to a multiple of 8; one side given, the other follows it; both given, they
    must match
    the picture's aspect to within that rounding (else ValueError: the picture would be distorted). The
    picture replaces phase 1, so it is encoded at phase 1's size from `scale_sizes` (H // S, W // S with
    S = int(max(H, W) / base), down to whole latents), which keeps the aspect up to that rounding.
    """
    def other(side: int, ratio: float) -> int:
        return max(8, round(side * ratio / 8) * 8)

    if height is None and width is None:
        long = max(2 * base, -(-max(img_w, img_h) // base) * base)
        if img_w >= img_h:
            width, height = long, other(long, img_h / img_w)
        else:
            height, width = long, other(long, img_w / img_h)
    elif width is None:
        width = other(height, img_w / img_h)
    elif height is None:
        height = other(width, img_h / img_w)
    elif abs(width - height * img_w / img_h) > 8 and abs(height - width * img_h / img_w) > 8:
        raise ValueError(f"size {width}x{height} does not have the input image's aspect ({img_w}x{img_h}); "
                         f"give only the width or only the height and the other follows the image")
    h, w = scale_sizes(height, width, base)[0]
    return Sizes((height, width), (8 * h, 8 * w))
