"""Time and memory per scale as a PNG, drawn with PIL (matplotlib is not a dependency)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H, PAD = 1000, 480, 60
COLOURS = {"denoise": (52, 101, 164), "decode": (237, 125, 49)}


def _panel(draw: ImageDraw.ImageDraw, box, title: str, unit: str, labels: list[str], series: dict[str, list[float]],
           stacked: bool, font) -> None:
    x0, y0, x1, y1 = box
    draw.text((x0, y0 - 40), title, fill="black", font=font)
    top = 1.1 * max((sum(v) if stacked else max(v)) for v in zip(*series.values())) or 1.0
    draw.line((x0, y1, x1, y1), fill="black")
    draw.line((x0, y0, x0, y1), fill="black")
    for k in range(5):  # gridlines with values
        y = y1 - (y1 - y0) * k / 4
        draw.line((x0 - 4, y, x1, y), fill=(220, 220, 220) if k else "black")
        draw.text((x0 - 55, y - 6), f"{top * k / 4:.3g}", fill="black", font=font)
    draw.text((x0 - 55, y0 - 22), unit, fill="black", font=font)
    slot = (x1 - x0) / len(labels)
    names = list(series)
    for i, label in enumerate(labels):
        base = y1
        for j, name in enumerate(names):
            v = series[name][i]
            h = (y1 - y0) * v / top
            if stacked:
                left, right = x0 + slot * (i + 0.2), x0 + slot * (i + 0.8)
                draw.rectangle((left, base - h, right, base), fill=COLOURS[name])
                base -= h
            else:
                width = 0.6 / len(names)
                left = x0 + slot * (i + 0.2 + j * width)
                draw.rectangle((left, y1 - h, left + slot * width, y1), fill=COLOURS[name])
        draw.text((x0 + slot * (i + 0.3), y1 + 6), label, fill="black", font=font)
    for j, name in enumerate(names):  # legend, beside the title
        lx = x1 - 170 + 80 * j
        ly = y0 - 40
        draw.rectangle((lx, ly, lx + 12, ly + 12), fill=COLOURS[name])
        draw.text((lx + 18, ly), name, fill="black", font=font)


def draw(result: dict, path: Path) -> Path:
    scales = result["generation"]["scales"]
    labels = [f"x{r['scale']} {r['image_size'][0]}x{r['image_size'][1]}" for r in scales]
    mem_key = "peak_allocated_bytes" if result["device"].startswith("cuda") else "peak_rss_growth_bytes"
    gib = float(1 << 30)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    s = result["settings"]
    d.text((PAD, 10), f"minifusion bench: {s['model']} on {result['device']} ({s['dtype']}), "
                      f"{s['steps']} steps, view batch {s['view_batch']}", fill="black", font=font)
    half = W // 2
    _panel(d, (PAD + 10, 80, half - 30, H - 50), "seconds per scale", "s", labels,
           {"denoise": [r["denoise_seconds"] for r in scales], "decode": [r["decode_seconds"] for r in scales]},
           True, font)
    mem_title = "peak allocated per phase" if mem_key == "peak_allocated_bytes" else "peak RSS growth per phase"
    _panel(d, (half + PAD + 10, 80, W - 30, H - 50), mem_title, "GiB", labels,
           {"denoise": [r["denoise_memory"].get(mem_key, 0) / gib for r in scales],
            "decode": [r["decode_memory"].get(mem_key, 0) / gib for r in scales]}, False, font)
    img.save(path)
    return path
