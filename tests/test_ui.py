"""The web UI (minifusion.ui) in a real browser: the app on the tiny random model in a subprocess, driven by
headless Chromium (Debian's chromium + chromium-driver, through Selenium), plus its /generate endpoint through
gradio_client and the UI's pure parts (presets, validation, resume checks, ETA, the adapter folders, reloading)
on their own.

The browser tests share one app and one page and run in file order (the continue test continues the first
run). The app's weights folder holds what users load beside the checkpoint (tests/helpers.write_adapters):
loras/, vae/, embeddings/, controlnet/. On a failure the page's screenshot and HTML go to that test's tmp dir,
and the app's log is printed. MINIFUSION_UI_SCREENSHOT=docs/ui.png also saves the page there once the run with
LoRA, VAE and ControlNet is done (the README's).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from helpers import serving, start_ui, stop, wait_for, write_adapters
from PIL import Image
from safetensors.torch import save_file
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from minifusion import request, ui
from minifusion.access import exposure_notice
from minifusion.files import load_latents
from minifusion.metadata import parse_a1111
from minifusion.studio import Studio
from minifusion.tiny import TINY, random_models, write_single_file
from minifusion.uploads import Uploads

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
BASE, WINDOW = 256, 32  # the tiny model's
FAST = {"steps": 2, "seed": 7}
needs_browser = pytest.mark.skipif(not (CHROMIUM.exists() and DRIVER.exists()),
                                   reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, "
                                   "/usr/bin/chromedriver): apt-get install chromium chromium-driver")


def metadata(png: Path) -> dict:
    with Image.open(png) as im:
        return json.loads(im.text["minifusion"])


def of_seed(outputs: Path, seed: int) -> list[Path]:
    """The PNGs a run of that seed wrote: NNNNN-<seed>.png and NNNNN-<seed>.xS.png."""
    return sorted(p for p in outputs.glob("*.png") if re.fullmatch(rf"\d{{5}}-{seed}(\.x\d+)?\.png", p.name))


def pixels(png: Path) -> bytes:
    with Image.open(png) as im:
        return im.convert("RGB").tobytes()


# ---------------------------------------------------------------------------------------------- pure parts

def test_size_presets_are_valid_requests_of_the_named_sizes():
    presets = ui.size_presets(1024)
    assert presets["2048 × 2048 (1:1, 2 scales)"] == (2048, 2048)
    assert presets["4096 × 4096 (1:1, 4 scales)"] == (4096, 4096)
    assert presets["2048 × 1536 (4:3)"] == (2048, 1536) and presets["1536 × 2048 (3:4)"] == (1536, 2048)
    assert presets["2048 × 1360 (3:2)"] == (2048, 1360)  # 1365.3 rounded down to a multiple of 8
    assert presets["1152 × 2048 (9:16)"] == (1152, 2048)
    for base in (256, 1024):
        for w, h in ui.size_presets(base).values():
            request.check_size(h, w, base)


def test_the_page_says_when_anyone_on_the_network_may_use_it(tiny_pipe, tiny_file, tmp_path):
    notice = exposure_notice("0.0.0.0", 7860, login=False)
    studio = Studio(tiny_pipe, tiny_file, tmp_path, Uploads(tmp_path / "uploads", 1 << 20))
    shown = [c["props"].get("value") for c in ui.build_app(studio, notice).get_config_file()["components"]
             if c["props"].get("elem_id") == "exposed"]
    assert shown == [notice] and "without a login" in notice and "--auth-file" in notice
    assert not [c for c in ui.build_app(studio).get_config_file()["components"]
                if c["props"].get("elem_id") == "exposed"]



# ----------------------------------------------------------------------------------------------- the app

def cli_run(env, out: Path, *flags) -> subprocess.Popen:
    """The CLI making `out` in the background (the settings of the page's runs by default)."""
    out.parent.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "minifusion", "a red fox", "--out", str(out), "--width", "512",
                             "--height", "256", "--steps", "2", "--seed", "7", "--device", "cpu", "--dtype", "float32",
                             *map(str, flags)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The UI on the tiny model in a subprocess whose working, temporary and home folders are empty but for its
    weights/ (as a user keeps it, in the working folder), so that the last test can see whether anything was
    written outside the output folder. weights/ holds a LoRA, a second VAE, an embedding and a ControlNet where
    the UI looks for them; the control picture lies outside it."""
    root = tmp_path_factory.mktemp("ui")
    work, tmp, home = root / "work", root / "tmp", root / "home"
    for d in (work, tmp, home):
        d.mkdir()
    folder = work / "weights"
    for sub in ("loras", "vae", "embeddings", "controlnet"):
        (folder / sub).mkdir(parents=True)
    weights = write_single_file(random_models(TINY, seed=0), TINY, folder / "tiny_sdxl.safetensors")
    adapters = {"lora": folder / "loras" / "style.safetensors", "vae": folder / "vae" / "other_vae.safetensors",
                "embedding": folder / "embeddings" / "neggy.safetensors", "controlnet": folder / "controlnet" / "cn",
                "picture": root / "square.png"}
    write_adapters(*adapters.values())
    given = sorted(p for p in folder.rglob("*") if p.is_file())
    log = root / "app.log"
    # one torch thread each: the app and the CLI's reference runs side by side, and on busy cores a thread
    # waiting at an OpenMP barrier for a descheduled one stalls a whole step
    env = {**os.environ, "TMPDIR": str(tmp), "HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    proc, url = start_ui(weights, work, log, env)
    try:
        # while the app starts: the CLI's pictures for the settings of the page's first run and of its run with
        # LoRA, VAE and ControlNet (the embedding loads in both, as the app loads it at start)
        reference, adapted = root / "cli" / "fox.png", root / "cli" / "adapted.png"
        runs = [cli_run(env, reference, "--weights", weights, "--embedding", adapters["embedding"]),
                cli_run(env, adapted, "--weights", weights, "--embedding", adapters["embedding"], "--negative", "neggy",
                        "--lora", f"{adapters['lora']}:0.7", "--vae", adapters["vae"], "--controlnet",
                        adapters["controlnet"], "--control-image", adapters["picture"], "--canny",
                        "--control-scale", "0.8")]
        for run in runs:
            finish(run)
        serving(proc, url, log)
        yield {"url": url, "proc": proc, "weights": weights, "root": root, "work": work, "outputs": work / "outputs",
               "tmp": tmp, "home": home, "log": log, "cli_png": reference, "cli_adapted": adapted, "env": env,
               "given": given, **adapters}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser(app):
    downloads = app["root"] / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1700", f"--user-data-dir={app['root'] / 'chromium'}"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    driver.downloads = downloads
    driver.get(app["url"])
    wait_for(lambda: css(driver, "#prompt textarea"), 60, "the page to render")
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, app, request, tmp_path):
    """The shared page; on a failure its screenshot, HTML and the app's log go to this test's tmp dir."""
    failed = request.session.testsfailed
    yield browser
    if request.session.testsfailed > failed:
        browser.save_screenshot(str(tmp_path / "page.png"))
        (tmp_path / "page.html").write_text(browser.page_source)
        shutil.copy(app["log"], tmp_path / "app.log")
        print(f"screenshot, page and app log in {tmp_path}\n{app['log'].read_text()[-3000:]}")


def css(driver, selector):
    return driver.find_elements(By.CSS_SELECTOR, selector)


def text(driver, selector) -> str:
    found = css(driver, selector)
    return found[0].text if found else ""


def fill(driver, elem_id: str, value) -> None:
    box = wait_for(lambda: css(driver, f"#{elem_id} textarea, #{elem_id} input"), 30, f"#{elem_id}")[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(str(value))


def click(driver, elem_id: str) -> None:
    css(driver, f"#{elem_id}")[0].click()


def choose(driver, elem_id: str, *names: str) -> None:
    """Pick options of a dropdown (several, in order, in a multiselect) as a user clicks them."""
    for name in names:
        wait_for(lambda: css(driver, f"#{elem_id} input"), 10, f"#{elem_id}")[0].click()  # an accordion renders late
        wait_for(lambda: css(driver, f'li[data-testid="dropdown-option"][aria-label="{name}"]'), 10,
                 f"{name} offered at #{elem_id}")[0].click()
    css(driver, "h2")[0].click()  # closes a multiselect's list


def unpick(driver, elem_id: str, name: str) -> None:
    css(driver, f"#{elem_id} .token")[[t.text for t in css(driver, f"#{elem_id} .token")].index(name)] \
        .find_element(By.CSS_SELECTOR, ".token-remove").click()


def slide(driver, elem_id: str, value: float) -> None:
    """Type a slider's value into its number box, as a user does for an exact value."""
    box = css(driver, f"#{elem_id} input[type=number]")[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def natural_size(driver, selector: str) -> tuple[int, int] | None:
    found = css(driver, selector)
    size = found and driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", found[0])
    return tuple(size) if size and size[0] else None


def reachable(driver, selector: str) -> bool:
    """The element is what a click at its centre lands on: nothing is laid over it."""
    return driver.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                 "return document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2) === arguments[0]",
                                 css(driver, selector)[0])


def gallery_sizes(driver) -> list[tuple[int, int]]:
    """The natural (decoded) sizes of the images the gallery shows, once each has loaded."""
    return [tuple(driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", im))
            for im in css(driver, "#gallery img")]


def finished(driver) -> str:
    status = text(driver, "#status")
    return status if status.startswith(("done", "error", "cancelled")) else ""


def set_request(driver, prompt="a red fox", width=512, height=256, steps=2, seed=7):
    fill(driver, "prompt", prompt)
    fill(driver, "width", width)
    fill(driver, "height", height)
    fill(driver, "steps", steps)
    random_seed = css(driver, "#random-seed input")[0]
    if random_seed.is_selected():  # the seed typed, not a new random one
        random_seed.click()
    fill(driver, "seed", seed)


@needs_browser
def test_a_run_streams_every_scale_and_downloads_the_png_with_the_clis_metadata(page, app):
    assert "its images are noise" in text(page, "#tiny-notice")  # the tiny model says so
    # a random seed each run, as the command line draws one (the page once defaulted to a fixed 0)
    assert css(page, "#random-seed input")[0].is_selected()
    assert css(page, "#seed input")[0].get_attribute("value") == "-1"
    set_request(page)
    clicked = time.perf_counter()
    click(page, "generate")
    # streaming: the base scale is on the page while scale 2 is still being computed
    wait_for(lambda: len(gallery_sizes(page)) == 1 and not finished(page), 60, "the first scale alone")
    first_image = time.perf_counter() - clicked
    assert "done in" in text(page, '#progress [data-scale="1"]')
    assert "done" not in text(page, '#progress [data-scale="2"]')
    status = wait_for(lambda: finished(page), 90, "the run to finish")
    total = time.perf_counter() - clicked
    print(f"time to the first image {first_image:.2f} s, to the last {total:.2f} s")
    assert status.startswith("done: 512x256"), status
    assert wait_for(lambda: gallery_sizes(page) if (0, 0) not in gallery_sizes(page) else None, 10,
                    "the images to load") == [(256, 128), (512, 256)]
    assert "done in" in text(page, '#progress [data-scale="2"]')
    # 2 steps x 2 (CFG) x (1 view, then 3 windows and 4 dilated views)
    assert "32 of 32 UNet evaluations" in text(page, "#progress")
    assert len(css(page, "#slider img")) == 2

    css(page, '#download a[download]')[0].click()
    png = wait_for(lambda: next(iter(page.downloads.glob("*.png")), None), 30, "the download")
    meta = metadata(png)
    assert Image.open(png).size == (512, 256)
    assert meta["scale"] == 2 and meta["settings"]["prompt"] == "a red fox"
    assert {k: meta["settings"][k] for k in ("width", "height", "steps", "seed", "stride")} == \
        {"width": 512, "height": 256, "steps": 2, "seed": 7, "stride": 16}
    assert Image.open(png).text["parameters"].startswith("a red fox")
    # the CLI with the same settings draws the same picture
    assert pixels(app["cli_png"]) == pixels(png)
    assert meta["settings"] == metadata(app["cli_png"])["settings"]  # the embedding and `canny: false` included


@needs_browser
def test_continue_to_a_larger_size_resumes_from_the_last_scale(page, app):
    before = set(app["outputs"].glob("*.png"))
    fill(page, "width", 768)
    fill(page, "height", 384)
    click(page, "continue")
    wait_for(lambda: text(page, "#status").startswith("running"), 30, "the continued run to start")
    status = wait_for(lambda: finished(page), 120, "the continued run to finish")
    assert status.startswith("done: 768x384"), status
    assert wait_for(lambda: gallery_sizes(page) if (0, 0) not in gallery_sizes(page) else None, 10,
                    "the images to load") == [(256, 128), (512, 256), (768, 384)]
    assert "from the run continued" in text(page, '#progress [data-scale="2"]')
    # only scale 3 was computed and written, under the next number
    assert sorted(set(app["outputs"].glob("*.png")) - before) == [app["outputs"] / "00002-7.png"]
    meta, first = metadata(app["outputs"] / "00002-7.png"), metadata(app["outputs"] / "00001-7.png")
    assert Image.open(app["outputs"] / "00002-7.png").size == (768, 384)
    assert meta["scale"] == 3 and meta["settings"] == {**first["settings"], "width": 768, "height": 384}
    assert load_latents(app["outputs"] / "00002-7.latent.safetensors").scale == 3


@needs_browser
def test_a_bad_request_shows_the_clis_message_inline(page, app):
    files = set(app["outputs"].iterdir())
    set_request(page, width=500)
    click(page, "generate")
    wait_for(lambda: "Width 500 is not a multiple of 8; pick e.g. 496" in text(page, "#width"), 20,
             "the inline error at the width")
    assert set(app["outputs"].iterdir()) == files and finished(page).startswith("done")  # nothing ran
    fill(page, "width", 512)
    # ControlNet settings without a ControlNet (start after end passed silently); the message sits above the
    # slider, not over its value and track as Gradio lays it
    css(page, "#control .label-wrap")[0].click()
    wait_for(lambda: css(page, "#control-start input[type=number]"), 10, "the ControlNet's sliders")  # render late
    slide(page, "control-start", 0.8)
    slide(page, "control-end", 0.2)
    click(page, "generate")
    wait_for(lambda: "Start steers a ControlNet: give ControlNet and Control image too" in text(page, "#control-start"),
             20, "the inline error at the ControlNet's start")
    assert reachable(page, "#control-start input[type=number]") and reachable(page, "#control-start input[type=range]")
    slide(page, "control-start", 0)
    slide(page, "control-end", 1)
    css(page, "#control .label-wrap")[0].click()  # closed again, as the later tests expect it
    assert set(app["outputs"].iterdir()) == files
    # a memory budget nothing fits in, refused before it runs as the CLI refuses it
    css(page, "#advanced .label-wrap")[0].click()
    fill(page, "max-memory", "1MiB")
    click(page, "generate")
    wait_for(lambda: "512x256 does not fit in 0.00 GiB" in text(page, "#max-memory"), 60,
             "the inline error at the memory budget")
    assert set(app["outputs"].iterdir()) == files
    fill(page, "max-memory", "")
    # a dropped file that is no picture though its name says so: one line at the picture (Gradio's own check
    # answered with a 400 that listed all 37 inputs)
    notes = app["root"] / "notes.png"
    notes.write_text("not a picture")
    css(page, "#img2img .label-wrap")[0].click()
    wait_for(lambda: css(page, "#image input[type=file]"), 10, "the picture's upload")[0].send_keys(str(notes))
    click(page, "generate")
    error = wait_for(lambda: "not a picture this server reads" in text(page, "#image") and text(page, "#image"), 30,
                     "the inline error at the picture")
    assert "notes.png: not a picture this server reads (PNG, JPEG, WEBP, TIFF, BMP, GIF)" in error
    assert set(app["outputs"].iterdir()) == files
    css(page, "#image .validation-error button[aria-label=Clear]")[0].click()  # read, dismissed
    wait_for(lambda: css(page, "#image button[aria-label='Remove Image']"), 10, "the remove button")[0].click()
    wait_for(lambda: not css(page, "#image button[aria-label='Remove Image']"), 10, "the picture to go")


@needs_browser
def test_the_generate_endpoint_queues_the_page_whose_cancel_withdraws_its_request(page, app):
    client = Client(app["url"], verbose=False, download_files=str(app["root"] / "client"))
    set_request(page, seed=8)
    job = client.submit("a red fox", width=512, height=256, api_name="/generate", **FAST)
    wait_for(lambda: job.status().code.name == "PROCESSING", 60, "the API call to start")
    click(page, "generate")
    wait_for(lambda: "queue: 1/1" in text(page, "#progress"), 30, "the page's queue position")
    click(page, "cancel")
    files, summary = job.result(timeout=120)
    assert [Image.open(f).size for f in files] == [(256, 128), (512, 256)]
    assert [metadata(Path(f))["scale"] for f in files] == [1, 2]
    assert summary["settings"]["seed"] == 7 and [s["width"] for s in summary["scales"]] == [256, 512]
    assert pixels(Path(files[-1])) == pixels(app["cli_png"])  # the CLI's picture for the same settings
    status = wait_for(lambda: finished(page) if finished(page).startswith("cancelled") else None, 60, "cancel")
    assert status == "cancelled before the run started" and of_seed(app["outputs"], 8) == []
    with pytest.raises(AppError, match="Width 500 is not a multiple of 8"):
        client.predict("a red fox", width=500, height=256, api_name="/generate", **FAST)


@needs_browser
def test_cancel_stops_the_run_after_the_current_step_and_keeps_the_finished_scales(page, app):
    set_request(page, steps=8, seed=3)
    click(page, "generate")

    def scale_2_stepping():
        bar = css(page, '#progress [data-scale="2"] progress')
        return len(gallery_sizes(page)) == 1 and bar and int(bar[0].get_attribute("value")) >= 1

    wait_for(scale_2_stepping, 60, "scale 2's first step")
    click(page, "cancel")
    status = wait_for(lambda: finished(page), 60, "the run to stop")
    assert status.startswith("cancelled after step") and "/8 of scale 2; kept 1 finished scale(s)" in status, status
    assert gallery_sizes(page) == [(256, 128)]
    assert [p.name[6:] for p in of_seed(app["outputs"], 3)] == ["3.x1.png"]  # NNNNN-3.x1.png only


@needs_browser
def test_loras_vae_and_controlnet_load_when_picked_and_the_png_reruns_in_the_cli(page, app):
    """A LoRA that does not fit is refused at the picker in one line; then the LoRA at 0.7, the other VAE and
    the ControlNet on the Canny edges of a picture (previewed at phase 1's size): the pipeline loads again with
    them, the PNG records them as the CLI does, its pixels are the CLI's for the same flags, and
    `minifusion --settings-from` makes the same PNG byte for byte."""
    assert "<code>neggy</code>" in css(page, "#embeddings")[0].get_attribute("innerHTML")  # loaded at start
    bad = app["lora"].with_name("bad.safetensors")  # proj_in is 64 wide, not 32
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(64, 4)}, str(bad))
    click(page, "rescan")
    choose(page, "lora", "bad.safetensors", "style.safetensors")
    assert [text(page, f"#lora-weight-{i} [data-testid=block-info]") for i in (0, 1)] == \
        ["bad.safetensors weight", "style.safetensors weight"]
    slide(page, "lora-weight-1", 0.7)
    set_request(page)
    fill(page, "negative", "neggy")  # the embedding's word
    files, status = set(app["outputs"].iterdir()), text(page, "#status")
    click(page, "generate")
    error = wait_for(lambda: "does not fit this SDXL model" in text(page, "#lora") and text(page, "#lora"), 30,
                     "the inline error at the LoRAs")
    assert "bad.safetensors: does not fit this SDXL model; 1 misshapen" in error and str(bad) not in error
    assert set(app["outputs"].iterdir()) == files and text(page, "#status") == status  # nothing ran
    css(page, "#lora .validation-error button[aria-label=Clear]")[0].click()  # read, dismissed
    unpick(page, "lora", "bad.safetensors")
    wait_for(lambda: text(page, "#lora-weight-0 [data-testid=block-info]") == "style.safetensors weight", 10,
             "the weight slider to follow")
    assert css(page, "#lora-weight-0 input[type=number]")[0].get_attribute("value") == "0.7"  # kept its weight
    assert not css(page, "#lora-weight-1")  # hidden: one slider per picked LoRA
    choose(page, "vae", "other_vae.safetensors")
    css(page, "#control .label-wrap")[0].click()
    choose(page, "controlnet", "cn")
    wait_for(lambda: css(page, "#control-image input[type=file]"), 10, "the control image's upload")[0] \
        .send_keys(str(app["picture"]))
    wait_for(lambda: natural_size(page, "#control-image img"), 20, "the uploaded picture")  # the page settles
    css(page, "#canny input")[0].click()
    # phase 1 of a 512x256 run on the 256 px model is 256x128
    assert wait_for(lambda: natural_size(page, "#canny-preview img"), 20, "the Canny preview") == (256, 128)
    slide(page, "control-scale", 0.8)

    click(page, "generate")
    status = wait_for(lambda: finished(page) != status and finished(page), 120, "the run with LoRA, VAE and ControlNet")
    assert status.startswith("done: 512x256 in ") and "(after loading LoRA style.safetensors at 0.7, VAE " \
        "other_vae.safetensors, ControlNet cn, 1 embedding in " in status, status
    png = app["outputs"] / status.split("saved as ")[1]
    meta, cli_meta = metadata(png), metadata(app["cli_adapted"])
    kept = png.with_name(png.name.replace(".png", ".control.png"))
    assert meta["settings"] == {**cli_meta["settings"], "control_image": str(kept)}
    assert {k: meta["settings"][k] for k in ("lora", "vae", "controlnet", "embedding", "canny", "control_scale")} == {
        "lora": [[str(app["lora"]), 0.7]], "vae": str(app["vae"]), "controlnet": [str(app["controlnet"])],
        "embedding": [str(app["embedding"])], "canny": True, "control_scale": 0.8}
    assert pixels(kept) == pixels(app["picture"])  # the picture itself: the edges are made again from it
    a1111 = parse_a1111(Image.open(png).text["parameters"])
    assert a1111["Lora hashes"].startswith("style: ") and a1111["VAE"] == "other_vae.safetensors"
    assert a1111["TI hashes"].startswith("neggy: ") and a1111["negative"] == "neggy"
    assert pixels(png) == pixels(app["cli_adapted"])  # the CLI's picture for the same flags

    if target := os.environ.get("MINIFUSION_UI_SCREENSHOT"):
        css(page, "#advanced .label-wrap")[0].click()  # closed: the new controls in view
        # the page down to its last component, the footer left out
        bottom, chrome = page.execute_script(
            "const b = [...document.querySelectorAll('#download, #continue')].map(e => e.getBoundingClientRect()"
            ".bottom); return [Math.max(...b) + window.scrollY, outerHeight - innerHeight]")
        page.set_window_size(1400, int(bottom + chrome) + 30)
        page.execute_script("window.scrollTo(0, 0)")
        page.save_screenshot(target)
        page.set_window_size(1400, 1700)
    again = app["root"] / "cli" / "again.png"
    finish(subprocess.Popen([sys.executable, "-m", "minifusion", "--settings-from", str(png), "--out", str(again),
                             "--device", "cpu", "--dtype", "float32"], env=app["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True))
    assert again.read_bytes() == png.read_bytes()


@needs_browser
def test_the_generate_endpoint_takes_loras_vae_and_controlnet_by_their_names(app):
    client = Client(app["url"], verbose=False, download_files=str(app["root"] / "client"))
    adapted = dict(negative="neggy", width=512, height=256, lora=["style.safetensors:0.7"], vae="other_vae.safetensors",
                   controlnet="cn", control_image=handle_file(str(app["picture"])), canny=True, control_scale=0.8,
                   api_name="/generate", **FAST)
    files, summary = client.predict("a red fox", **adapted)
    assert pixels(Path(files[-1])) == pixels(app["cli_adapted"])
    # files by their names in the app's folders, as /generate takes them: the reply names no server folder
    assert summary["settings"]["lora"] == [["style.safetensors", 0.7]] and summary["settings"]["canny"] is True
    assert summary["settings"]["controlnet"] == ["cn"] and summary["settings"]["control_image"].endswith(".control.png")
    assert str(app["root"]) not in json.dumps(summary)
    for lora, message in ((["bad.safetensors"], "bad.safetensors: does not fit this SDXL model"),
                          (["../tiny_sdxl.safetensors:0.5"], "not in the LoRA folder"),
                          (["style.safetensors:lots"], "no such LoRA")):
        with pytest.raises(AppError, match=message):
            client.predict("a red fox", **{**adapted, "lora": lora})
    with pytest.raises(AppError, match="Control image steers a ControlNet"):
        client.predict("a red fox", **{**adapted, "controlnet": None})


@needs_browser
def test_nothing_is_written_outside_the_output_folder(app):
    """Files, that is: torch leaves an empty $TMPDIR/torchinductor_<user> behind. Allowed outside: minifusion's
    own caches in ~/.cache/minifusion (the weights' hashes, the memory model's measurements), the CLI's too,
    weights/ as the tests wrote it (the broken LoRA added), and the server's upload folder in $TMPDIR (removed
    when it stops)."""
    log = app["log"].read_text()
    uploads = Path(re.search(r"uploads in (\S+) while it runs", log).group(1))
    assert uploads.parent == app["tmp"] and not uploads.is_relative_to(app["outputs"])
    files = [p for d in ("work", "tmp", "home") for p in app[d].rglob("*") if p.is_file()]
    outside = [p for p in files if not p.is_relative_to(app["outputs"]) and not p.is_relative_to(uploads)]
    weights = app["weights"].parent
    assert [p for p in outside if not p.is_relative_to(app["home"] / ".cache" / "minifusion")
            and not p.is_relative_to(weights)] == []
    assert sorted(p for p in outside if p.is_relative_to(weights)) == sorted([*app["given"],
                                                                              weights / "loras" / "bad.safetensors"])
    assert {p.name for p in app["outputs"].iterdir()} >= {"00001-7.png", "00001-7.x1.png"}
    assert f"UI on {app['url']}" in log and "reachable from the network" not in log
