"""The one way the web UI opens a file a client names (the picture to upscale, the control image, the size
probe's, the Canny preview's): only pictures uploaded to this server, their headers checked before any pixel is
decoded, a bounded number of decodes at once. Gradio-free, as minifusion.studio is."""
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from .checkpoint import trim_heap
from .encode import ImageError, open_image

# What this server decodes for its clients: the formats browsers and cameras write. Pillow reads many more
# (EPS, say, by running Ghostscript), none worth their risk on a server.
PICTURE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")
# 16 and 32 bits a channel: open_image goes through float64 arrays, ~30 bytes a pixel at the peak where 8-bit
# pictures take 12 (RGB) to 20 (RGBA); such pictures get a third of the pixel limit, so that no decode costs more
DEEP_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
MODES = DEEP_MODES | {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
ORIENTATION = 0x0112  # EXIF: 5 to 8 turn the picture a quarter, swapping its sides


@dataclass(frozen=True)
class Upload:
    """A client's picture, its header read: a file in the upload folder."""
    path: Path
    size: tuple[int, int]  # (width, height) upright, as open_image returns it

    @property
    def name(self) -> str:
        """What messages call it: the name the client gave the file (Gradio keeps it), not where it lies."""
        return self.path.name


class Uploads:
    """The one way a client's file is opened. A client names files (the picture to upscale, the control image),
    but only those uploaded to this server are read: files in Gradio's upload folder, which is this server's
    own. Anything else is refused in the same words whether or not it exists, so replies tell nothing of the
    server's disk. A picture's header is read before any pixel: its format, mode and pixel count; a decode holds
    at most `max_pixels` (a third of it at 16 or 32 bits a channel), and at most `decodes` run at once, as the
    size probe, the Canny preview and validation answer outside the generation queue."""

    def __init__(self, folder: Path, max_pixels: int, decodes: int = 2):
        self.folder = Path(os.path.realpath(folder))
        self.max_pixels = max_pixels
        self._decoding = threading.BoundedSemaphore(decodes)

    def open(self, given) -> Upload:
        """The picture a client named (a path, or a FileData dict holding one) from its header, else
        ImageError."""
        path = given.get("path") if isinstance(given, dict) else given
        real = Path(os.path.realpath(path)) if isinstance(path, str) and path else None
        # is_file after the folder check: a path outside it is not even looked at
        if real is None or not real.is_relative_to(self.folder) or not real.is_file():
            shown = Path(path).name if isinstance(path, str) else type(path).__name__
            raise ImageError(f"{shown}: not a picture uploaded to this server; upload it")
        with self._header(Upload(real, (0, 0))) as img:
            return Upload(real, img.size[::-1] if _turned(img) else img.size)

    def check(self, upload: Upload) -> None:
        """ImageError if its data does not decode (truncated or corrupt data shows only then), decoded at the
        least size a JPEG allows."""
        with self.decoded(upload, (1, 1)):
            pass

    @contextmanager
    def decoded(self, upload: Upload, fit: tuple[int, int] | None = None) -> Iterator[Image.Image]:
        """The picture's pixels as open_image makes them (8-bit RGB, upright) while the block runs, one of the
        few decodes allowed at a time. A JPEG is decoded at the smallest of 1, 1/2, 1/4, 1/8 of its size that
        is still at least fit = (width, height): libjpeg's own scaling, no full-size pixels made first.
        ImageError for data that does not decode."""
        with self._decoding, self._header(upload) as img:
            if fit is not None and img.format == "JPEG":
                img.draft(img.mode, fit[::-1] if _turned(img) else fit)
            picture = open_image(img, upload.name)
            try:
                yield picture
            finally:
                # glibc keeps what each request's thread freed in that thread's own heap: without handing the
                # pages back, every thread that ever decoded would hold a picture's worth of memory
                trim_heap(0)

    @contextmanager
    def _header(self, upload: Upload) -> Iterator[Image.Image]:
        """The picture opened (its header read, no pixels), if this server decodes it."""
        name = upload.name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit below is lower
                img = Image.open(upload.path, formats=PICTURE_FORMATS)
        except Image.DecompressionBombError:
            raise ImageError(f"{name}: over Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels") from None
        except (OSError, SyntaxError, ValueError):  # UnidentifiedImageError included
            raise ImageError(f"{name}: not a picture this server reads ({', '.join(PICTURE_FORMATS)})") from None
        with img:
            w, h = img.size
            deep = img.mode in DEEP_MODES
            limit = self.max_pixels // 3 if deep else self.max_pixels
            if img.mode not in MODES:
                raise ImageError(f"{name}: its pixels are {img.mode}, which this server does not read")
            if w * h > limit:
                raise ImageError(f"{name}: {w}x{h} is more than this server decodes, {limit / 1e6:.1f} million "
                                 "pixels" + (" at 16 or 32 bits a channel" if deep else "") + "; make it smaller")
            yield img


def _turned(img: Image.Image) -> bool:
    """Whether the picture's EXIF turns it a quarter (its sides swap when shown), from its header alone: a PNG
    whose EXIF comes after its pixels would be decoded whole to find it, so that one counts as upright (a size
    that then disagrees is refused by the run, in one line)."""
    if img.format == "PNG" and "exif" not in img.info:
        return False
    return img.getexif().get(ORIENTATION) in (5, 6, 7, 8)
