"""The web UI (minifusion.ui) in a real browser: the app on the tiny random model in a subprocess, driven by
headless Chromium (Debian's chromium + chromium-driver, through Selenium), plus its /generate endpoint through
gradio_client and the UI's pure parts (presets, validation, resume checks, ETA) on their own.

The browser tests share one app and one page and run in file order (the continue test continues the first
run). On a failure the page's screenshot and HTML go to that test's tmp dir, and the app's log is printed.
MINIFUSION_UI_SCREENSHOT=docs/ui.png also saves the page there once the continued run is done (the README's).
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from minifusion import ui
from minifusion.files import SavedScale, load_latents
from minifusion.metadata import CLI_SETTINGS
from minifusion.pipeline import check_request
from minifusion.tiny import TINY, random_models, write_single_file

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
BASE, WINDOW = 256, 32  # the tiny model's
FAST = {"steps": 2, "seed": 7}
needs_browser = pytest.mark.skipif(not (CHROMIUM.exists() and DRIVER.exists()),
                                   reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, "
                                   "/usr/bin/chromedriver): apt-get install chromium chromium-driver")


def wait_for(condition, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


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
            check_request(base, base // 8, h, w, stride=base // 16)


@pytest.mark.parametrize("values,field,message", [
    ({"width": 500}, "width", "width 500 is not a multiple of 8; pick e.g. 496"),
    ({"width": 128, "height": 128}, "size", "below this model's base size"),
    ({"steps": 0}, "steps", "num_inference_steps 0 is invalid"),
    ({"sigma": 0}, "sigma", "sigma 0 is invalid"),
    ({"stride": 33}, "stride", "stride 33 is invalid; it must be an integer from 1 to the window size, 32"),
    ({"max_memory": "lots"}, "max_memory", "'lots' is not a memory size"),
    ({"prompt": "  "}, "prompt", "no prompt given"),
])
def test_bad_requests_name_the_field_with_the_clis_message(values, field, message):
    with pytest.raises(ui.RequestError, match=message) as err:
        ui.check(ui.settings_from({"prompt": "a fox", **values}, BASE, WINDOW), BASE, WINDOW)
    assert err.value.field == field


def test_settings_are_the_clis_with_its_defaults():
    s = ui.settings_from({"prompt": " a fox ", "negative": "", "width": None, "view_batch": None,
                          "max_memory": "1.5", "random_seed": True}, BASE, WINDOW)
    assert s == {"prompt": "a fox", "negative": None, "height": 512, "width": 512, "steps": 50, "guidance": 7.5,
                 "seed": None, "scheduler": "ddim", "stride": 16, "view_batch": None, "c1": 3.0, "c2": 1.0,
                 "c3": 1.0, "sigma": 0.8, "tiled_decode": True, "jitter": True, "image": None,
                 "max_memory": 3 * 2**29, "control_image": None, "control_scale": 1.0, "control_start": 0.0,
                 "control_end": 1.0, "guess_mode": False}
    ui.check(s, BASE, WINDOW)


def test_a_missing_side_follows_the_pictures_aspect(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "p.png")
    s = ui.settings_from({"prompt": "a fox", "image": str(tmp_path / "p.png")}, BASE, WINDOW)
    assert (s["width"], s["height"]) == (512, 344)
    with pytest.raises(ui.RequestError, match="does not have the input image's aspect") as err:
        ui.check({**s, "width": 512, "height": 512}, BASE, WINDOW)
    assert err.value.field == "size"


def test_continuing_must_add_scales_at_the_same_aspect():
    saved = SavedScale(2, torch.zeros(1, 4, 64, 64), 0.0, 1.0, None, {})  # scale 2 of a 512x512 run
    ui.check_resume(saved, 768, 768, BASE)
    with pytest.raises(ui.RequestError, match="already reached scale 2; ask for a larger size"):
        ui.check_resume(saved, 512, 512, BASE)
    with pytest.raises(ui.RequestError, match="latents are 64x64, but a 1024x768 run has 64x48 there; keep the aspect"):
        ui.check_resume(saved, 768, 1024, BASE)


def test_the_eta_from_unet_evaluations_done_and_left():
    p = ui.RunProgress([(168, 256), (336, 512), (512, 768)], [4, 100, 300], steps=2, started=10.0)
    assert p.eta(now=11.0) is None and "ETA: after the first step" in p.html()
    p.step(ui.Step(1, 2, 2, 4))
    assert p.eta(now=12.0) == pytest.approx(2.0 * 400 / 4)
    p.step(ui.Step(2, 1, 2, 50))
    assert p.eta(now=20.0) == pytest.approx(10.0 * 350 / 54)
    # continuing from scale 2: only scale 3's evaluations are left to do
    q = ui.RunProgress([(168, 256), (336, 512), (512, 768)], [4, 100, 300], steps=2, first=3, started=0.0)
    q.step(ui.Step(3, 1, 2, 150))
    assert q.eta(now=3.0) == pytest.approx(3.0) and "from the run continued" in q.html()


def test_cancel_stops_after_the_current_step_and_keeps_finished_scales(tiny_pipe):
    """Also: the ETA's count of UNet evaluations per scale is the one the run reports."""
    cancel = threading.Event()
    seen = []
    # cancel pressed once scale 2's first step is reported: the step then in progress (the second, or the
    # third if it had already begun) is the last
    with pytest.raises(ui.Cancelled, match="cancelled after step [23]/4 of scale 2") as stopped:
        for ev in ui.stream(tiny_pipe, "a fox", {"height": 384, "width": 512, "num_inference_steps": 4}, cancel):
            seen.append(ev)
            if isinstance(ev, ui.Step) and ev.scale == 2 and ev.step == 1:
                cancel.set()
    last = int(str(stopped.value).split()[3][0])
    steps = [e for e in seen if isinstance(e, ui.Step)]
    assert [(e.scale, e.step) for e in steps] == [(1, i) for i in range(5)] + [(2, i) for i in range(last + 1)]
    assert [e.scale for e in seen if not isinstance(e, ui.Step)] == [1]
    per_scale = ui.scale_evals(TINY.unet, 384, 512, WINDOW // 2, 4)
    assert per_scale[0] == steps[4].evals and per_scale[1] == 4 * steps[6].evals == 4 * steps[-1].evals / last


def test_a_runs_error_is_one_line_as_the_cli_words_it():
    settings = {"width": 4096, "height": 4096}
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
    assert ui.error_line(oom, settings) == ("out of memory even with one view per UNet call at 4096x4096; choose a "
                                            "smaller size or set a memory budget in the advanced settings")
    assert ui.error_line(ValueError("a.png: not an image\nmore"), settings) == "a.png: not an image"
    assert ui.error_line(KeyError("x"), settings) == "KeyError: 'x'"


def test_only_loopback_addresses_stay_off_the_network():
    assert not any(map(ui.reachable_from_network, ["127.0.0.1", "::1", "localhost", "127.0.1.1"]))
    assert all(map(ui.reachable_from_network, ["0.0.0.0", "::", "192.168.1.5", "myhost.local"]))


# ----------------------------------------------------------------------------------------------- the app

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The UI on the tiny model in a subprocess whose working, temporary and home folders are empty, so that
    the last test can see whether anything was written outside the output folder."""
    root = tmp_path_factory.mktemp("ui")
    weights = write_single_file(random_models(TINY, seed=0), TINY, root / "tiny_sdxl.safetensors")
    work, tmp, home = root / "work", root / "tmp", root / "home"
    for d in (work, tmp, home):
        d.mkdir()
    port = free_port()
    log = root / "app.log"
    # one torch thread each: the app and the CLI's reference run side by side, and on busy cores a thread
    # waiting at an OpenMP barrier for a descheduled one stalls a whole step
    env = {**os.environ, "TMPDIR": str(tmp), "HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "minifusion.ui", "--weights", str(weights), "--port", str(port),
                                 "--device", "cpu", "--dtype", "float32"], cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"the app exited ({proc.returncode}):\n{log.read_text()}")
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    try:
        # while the app starts: the CLI's picture for the settings of the page's first run and of the API call
        reference = root / "cli" / "fox.png"
        reference.parent.mkdir()
        done = subprocess.run([sys.executable, "-m", "minifusion", "a red fox", "--weights", str(weights), "--out",
                               str(reference), "--width", "512", "--height", "256", "--steps", "2", "--seed", "7",
                               "--device", "cpu", "--dtype", "float32"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        wait_for(up, 90, "the app to serve", every=0.2)
        yield {"url": url, "proc": proc, "weights": weights, "root": root, "work": work, "outputs": work / "outputs",
               "tmp": tmp, "home": home, "log": log, "cli_png": reference}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    fill(driver, "seed", seed)


@needs_browser
def test_a_run_streams_every_scale_and_downloads_the_png_with_the_clis_metadata(page, app):
    assert "its images are noise" in text(page, "#tiny-notice")  # the tiny model says so
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
    cli_settings = metadata(app["cli_png"])["settings"]
    assert meta["settings"] == {k: v for k, v in cli_settings.items() if k not in CLI_SETTINGS}


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
    if target := os.environ.get("MINIFUSION_UI_SCREENSHOT"):
        # the page down to its last component, the footer left out
        bottom, chrome = page.execute_script("const r = document.querySelector('#download').getBoundingClientRect();"
                                             "return [r.bottom + window.scrollY, outerHeight - innerHeight]")
        page.set_window_size(1400, int(bottom + chrome) + 30)
        page.save_screenshot(target)
        page.set_window_size(1400, 1700)
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
    wait_for(lambda: "width 500 is not a multiple of 8; pick e.g. 496" in text(page, "#width"), 20,
             "the inline error at the width")
    assert set(app["outputs"].iterdir()) == files and finished(page).startswith("done")  # nothing ran
    # a memory budget nothing fits in, refused before it runs as the CLI refuses it
    fill(page, "width", 512)
    css(page, "#advanced .label-wrap")[0].click()
    fill(page, "max-memory", "1MiB")
    click(page, "generate")
    wait_for(lambda: "512x256 does not fit in 0.00 GiB" in text(page, "#max-memory"), 60,
             "the inline error at the memory budget")
    assert set(app["outputs"].iterdir()) == files
    fill(page, "max-memory", "")


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
    with pytest.raises(AppError, match="width 500 is not a multiple of 8"):
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
def test_nothing_is_written_outside_the_output_folder(app):
    """Files, that is: torch leaves an empty $TMPDIR/torchinductor_<user> behind. Allowed outside: minifusion's
    own caches in ~/.cache/minifusion (the weights' hashes, the memory model's measurements), the CLI's too."""
    files = [p for d in ("work", "tmp", "home") for p in app[d].rglob("*") if p.is_file()]
    outside = [p for p in files if not p.is_relative_to(app["outputs"])]
    assert [p for p in outside if not p.is_relative_to(app["home"] / ".cache" / "minifusion")] == []
    assert {p.name for p in app["outputs"].iterdir()} >= {"00001-7.png", "00001-7.x1.png", ".gradio"}
    log = app["log"].read_text()
    assert f"UI on {app['url']}" in log and "reachable from the network" not in log
