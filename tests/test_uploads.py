"""The one way the web UI opens a client's file (minifusion.uploads): only pictures uploaded to the server, their
headers checked before any pixel, decodes bounded in size and number."""
import io
import os
import re
import threading
import time
from pathlib import Path

import pytest
from helpers import jpeg_header, uploaded
from PIL import Image

from minifusion import uploads as uploads_
from minifusion.encode import ImageError

MAX_PIXELS = 1024 * 1024


@pytest.fixture
def uploads(tmp_path) -> uploads_.Uploads:
    return uploads_.Uploads(tmp_path / "uploads", MAX_PIXELS)


def test_only_pictures_uploaded_to_this_server_are_opened_and_nothing_tells_what_else_exists(tmp_path, uploads,
                                                                                             monkeypatch):
    canary = tmp_path / "private" / "canary.png"
    canary.parent.mkdir()
    Image.new("RGB", (30, 20)).save(canary)
    fifo = tmp_path / "private" / "fifo.png"
    os.mkfifo(fifo)
    inside = Path(uploaded(uploads.folder, "ok.png", Image.new("RGB", (30, 20))))
    (inside.parent / "link.png").symlink_to(canary)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(uploads_.Image, "open",
                        lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    for given in (str(canary), {"path": str(canary)}, str(tmp_path / "private" / "missing.png"), str(fifo),
                  str(inside.parent / "link.png"), str(uploads.folder / ".." / "private" / "canary.png"), "/etc",
                  "", 12, {"url": "x"}):
        with pytest.raises(ImageError) as err:
            uploads.open(given)
        assert re.fullmatch(r"[^/\n]*: not a picture uploaded to this server; upload it", str(err.value))
    assert opened == []
    assert uploads.open({"path": str(inside), "meta": {"_type": "gradio.FileData"}}).size == (30, 20)


def test_a_pictures_header_is_checked_before_its_pixels_are_decoded(uploads, monkeypatch):
    decoded = []
    monkeypatch.setattr(uploads_, "open_image", lambda img, name: decoded.append(name))
    deep = Image.new("I;16", (800, 800))  # 0.64 million pixels: over a third of the limit at 16 bits
    for name, data, message in (
            ("bomb.jpg", jpeg_header(9400, 9400), "bomb.jpg: 9400x9400 is more than this server decodes, 1.0 "
             "million pixels; make it smaller"),
            ("huge.jpg", jpeg_header(20000, 20000), "huge.jpg: over Pillow's limit of "),
            ("deep.png", deep, "deep.png: 800x800 is more than this server decodes, 0.3 million pixels at 16 or "
             "32 bits a channel"),
            ("notes.txt", b"not a picture", "notes.txt: not a picture this server reads (PNG, JPEG, WEBP, TIFF"),
            ("empty.png", b"", "empty.png: not a picture this server reads"),
            ("page.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a picture this server reads")):
        with pytest.raises(ImageError, match=re.escape(message)):
            uploads.open(uploaded(uploads.folder, name, data))
    assert decoded == []


def test_a_decode_is_one_line_when_the_data_is_broken_and_few_run_at_once(uploads, monkeypatch):
    whole = io.BytesIO()
    Image.new("RGB", (300, 200), (9, 9, 9)).save(whole, "PNG")
    truncated = uploads.open(uploaded(uploads.folder, "cut.png", whole.getvalue()[:200]))
    with pytest.raises(ImageError, match=r"^cut.png: the image data is truncated or corrupt") as err:
        with uploads.decoded(truncated):
            pass
    assert "\n" not in str(err.value)
    # a JPEG far larger than what is needed decodes at a fraction of its size (libjpeg's own scaling)
    big = uploads.open(uploaded(uploads.folder, "big.jpg", Image.new("RGB", (1024, 512)), quality=90))
    with uploads.decoded(big, fit=(256, 128)) as picture:
        assert picture.size == (256, 128) and picture.mode == "RGB"
    with uploads.decoded(big) as picture:
        assert picture.size == (1024, 512)
    # at most two decodes at a time, however many requests ask
    running, most, real = [0], [0], uploads_.open_image

    def slow(img, name):
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.2)
        running[0] -= 1
        return real(img, name)

    monkeypatch.setattr(uploads_, "open_image", slow)

    def decode():
        with uploads.decoded(big, fit=(128, 64)):
            pass

    threads = [threading.Thread(target=decode) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 2


def test_a_turned_jpeg_has_the_size_it_is_shown_at(uploads):
    exif = Image.Exif()
    exif[uploads_.ORIENTATION] = 6  # a quarter turn: stored 300 x 200, seen 200 x 300
    path = uploaded(uploads.folder, "phone.jpg", Image.new("RGB", (300, 200)), exif=exif)
    picture = uploads.open(path)
    assert picture.size == (200, 300)
    with uploads.decoded(picture, fit=(100, 150)) as pixels:  # halved: the fit is taken upright too
        assert pixels.size == (100, 150)
