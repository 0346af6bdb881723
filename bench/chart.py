"""Time and memory per scale as a PNG, drawn with PIL (matplotlib is not a dependency)."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H, PAD = 1000, 480, 60
COLOURS = {"denoise": (52, 101, 164), "decode": (237, 125, 49)}


def ticks(largest: float, most: int = 5) -> list[float]:
    """Gridline values 0, step, 2 step, ... up to the first at or above `largest`, with the smallest step of 1,
    2, 2.5 or 5 times a power of ten that needs at most `most` intervals."""
    if not largest > 0:
        return [0.0, 1.0]
    power = math.floor(math.log10(largest / most))
    # 10^(power + 1) > largest / most, so the loop always returns by its fifth step
    for step in (m * 10.0 ** e for e in (power, power + 1) for m in (1, 2, 2.5, 5)):
        intervals = math.ceil(largest / step - 1e-9)
        if intervals <= most:
            return [round(k * step, 12) for k in range(intervals + 1)]
    raise AssertionError(largest)


def title(result: dict) -> str:
    """What ran, with the view batch and decode tile the generation used (planned under --max-memory, or the
    defaults), not the --view-batch asked for."""
    s, scales = result["settings"], result["generation"]["scales"]
    batches = "/".join(str(b) for b in dict.fromkeys(r["view_batch_size"] for r in scales))
    tiles = "/".join("untiled" if t is None else str(t) for t in dict.fromkeys(r["decode_tile"] for r in scales))
    return (f"minifusion bench: {s['model']} on {result['device']} ({s['dtype']}), {s['width']}x{s['height']}, "
            f"{s['steps']} steps, view batch {batches}, decode tile {tiles}")


def _panel(draw: ImageDraw.ImageDraw, box, title: str, unit: str, labels: list[str], series: dict[str, list[float]],
           stacked: bool, font) -> None:
    x0, y0, x1, y1 = box
    draw.text((x0, y0 - 40), title, fill="black", font=font)
    grid = ticks(max((sum(v) if stacked else max(v)) for v in zip(*series.values())))
    top = grid[-1]
    draw.line((x0, y1, x1, y1), fill="black")
    draw.line((x0, y0, x0, y1), fill="black")
    for value in grid:  # gridlines with values
        y = y1 - (y1 - y0) * value / top
        draw.line((x0 - 4, y, x1, y), fill=(220, 220, 220) if value else "black")
        draw.text((x0 - 55, y - 6), f"{value:g}", fill="black", font=font)
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
    d.text((PAD, 10), title(result), fill="black", font=font)
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
