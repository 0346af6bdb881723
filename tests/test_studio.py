"""The web UI's machinery without a browser or Gradio (minifusion.studio): turning a page's or an API's values
into the CLI's settings and refusing bad ones under their field, the ETA, runs (one at a time, each with its own
cancel switch), the folders beside the checkpoint and loading the pipeline again for another set of them."""
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from helpers import uploaded
from safetensors.torch import save_file

from minifusion import folders, request, studio
from minifusion import uploads as uploads_
from minifusion.pipeline import resident
from minifusion.settings import SettingError
from minifusion.tiny import TINY

BASE, WINDOW = 256, 32  # the tiny model's
MAX_PIXELS = 1024 * 1024


@pytest.fixture
def uploads(tmp_path) -> uploads_.Uploads:
    return uploads_.Uploads(tmp_path / "uploads", MAX_PIXELS)


@pytest.fixture
def st(tiny_pipe, tiny_file, tmp_path, uploads) -> studio.Studio:
    return studio.Studio(tiny_pipe, tiny_file, tmp_path / "outputs", uploads)


@pytest.mark.parametrize("values,fields,message", [
    ({"width": 500}, ("width",), "Width 500 is not a multiple of 8; pick e.g. 496"),
    ({"width": 0}, ("width",), "Width 0 is invalid; it must be a positive multiple of 8"),  # was the default size
    ({"width": 128, "height": 128}, ("height", "width"), "below this model's base size"),
    ({"steps": 0}, ("steps",), "Steps per scale 0 is invalid; it must be an integer from 1 to 1000"),
    ({"sigma": 0}, ("sigma",), "sigma 0 is invalid"),
    ({"stride": 33}, ("stride",), "Stride 33 is invalid; it must be an integer from 1 to the window size, 32"),
    ({"max_memory": "lots"}, ("max_memory",), "'lots' is not a memory size"),
    ({"prompt": "  "}, ("prompt",), "no prompt given"),
    ({"sampler": "heun"}, ("sampler",), "Sampler 'heun' is invalid; it must be one of ddim, euler"),
    ({"timesteps": "999,x"}, ("timesteps",), "Timesteps: '999,x' is not a list of whole numbers"),
    ({"view_batch": "8.5"}, ("view_batch",), "View batch: '8.5' is not a whole number"),  # typed in a text box
    # start after end, without a ControlNet: passed silently before
    ({"control_start": 0.8, "control_end": 0.2}, ("control_start",), "Start steers a ControlNet: give ControlNet"),
])
def test_bad_requests_name_their_fields_in_the_pages_words(st, values, fields, message):
    with pytest.raises(studio.RequestError, match=re.escape(message)) as err:
        st.settings({"prompt": "a fox", **values})
    assert err.value.fields == fields and "\n" not in str(err.value)


def test_blank_fields_take_the_tables_defaults_and_the_seed_is_drawn(st):
    s = st.settings({"prompt": " a fox ", "negative": "", "width": None, "view_batch": " ", "stride": "",
                     "max_memory": "1.5", "seed": None, "sampler": "DPM++ 2M", "timesteps": " "})
    seed = s.pop("seed")
    assert isinstance(seed, int) and 0 <= seed < 2 ** 32
    assert s == {"prompt": "a fox", "negative": None, "height": 512, "width": 512, "steps": 50, "sampler": "dpmpp_2m",
                 "schedule": "karras", "timesteps": None, "eta": None, "guidance": 7.5, "guidance_rescale": 0.0,
                 "strength": 1.0, "prediction": "epsilon", "zero_snr": False, "stride": 16, "view_batch": None,
                 "c1": 3.0, "c2": 1.0, "c3": 1.0, "sigma": 0.8, "tiled_decode": True, "jitter": True, "image": None,
                 "max_memory": 3 * 2**29, "control_image": None, "control_scale": 1.0, "control_start": 0.0,
                 "control_end": 1.0, "guess_mode": False, "canny": False, "lora": [], "vae": None, "embedding": [],
                 "controlnet": []}
    typed = st.settings({"prompt": "a fox", "seed": 7, "view_batch": "4", "eta": "0.5", "sampler": "euler_a"})
    assert (typed["seed"], typed["view_batch"], typed["eta"]) == (7, 4, 0.5)


def test_a_missing_side_follows_the_pictures_aspect(st, uploads):
    picture = uploaded(uploads.folder, "p.png", Image.new("RGB", (300, 200)))
    s = st.settings({"prompt": "a fox", "image": picture})
    assert (s["width"], s["height"]) == (512, 344)
    with pytest.raises(studio.RequestError, match="does not have the input image's aspect") as err:
        st.settings({"prompt": "a fox", "image": picture, "width": 512, "height": 512})
    assert err.value.fields == ("height", "width")


def test_the_eta_from_unet_evaluations_done_and_left():
    p = studio.RunProgress([(168, 256), (336, 512), (512, 768)], [4, 100, 300], [2, 2, 2], started=10.0)
    assert p.eta(now=11.0) is None and "ETA: after the first step" in p.html()
    p.step(studio.Step(1, 2, 2, 4))
    assert p.eta(now=12.0) == pytest.approx(2.0 * 400 / 4)
    p.step(studio.Step(2, 1, 2, 50))
    assert p.eta(now=20.0) == pytest.approx(10.0 * 350 / 54)
    # continuing from scale 2: only scale 3's evaluations are left to do
    q = studio.RunProgress([(168, 256), (336, 512), (512, 768)], [0, 0, 300], [0, 0, 2], first=3, started=0.0)
    q.step(studio.Step(3, 1, 2, 150))
    assert q.eta(now=3.0) == pytest.approx(3.0) and "from the run continued" in q.html()
    # a strength below 1: the later scales run fewer steps, and their bars say so
    r = studio.RunProgress([(168, 256), (336, 512)], [4, 50], [2, 1], started=0.0)
    r.step(studio.Step(2, 0, 1, 0))
    assert '<progress max="1" value="0">' in r.html() and "step 0/1" in r.html()
    r.ended = "cancelled"  # no ETA stays on the page after a cancel
    assert "ETA " not in r.html() and "cancelled · 0 of 54" in r.html() and "stopped at step 0/1" in r.html()


def fox(st: studio.Studio, **values) -> dict:
    return st.settings({"prompt": "a fox", "height": 384, "width": 512, "steps": 4, "seed": 5, **values})


def test_cancel_stops_after_the_current_step_and_keeps_finished_scales(tiny_pipe, tiny_file, tmp_path, uploads):
    """Also: the ETA's count of UNet evaluations per scale is the one the run reports."""
    st = studio.Studio(tiny_pipe, tiny_file, tmp_path, uploads)
    cancel = threading.Event()
    seen = []
    # cancel pressed once scale 2's first step is reported: the step then in progress (the second, or the
    # third if it had already begun) is the last
    with pytest.raises(studio.Cancelled, match="cancelled after step [23]/4 of scale 2") as stopped:
        for ev in st.run(fox(st), cancel):
            seen.append(ev)
            if isinstance(ev, studio.Step) and ev.scale == 2 and ev.step == 1:
                cancel.set()
    last = int(str(stopped.value).split()[3][0])
    steps = [e for e in seen if isinstance(e, studio.Step)]
    assert [(e.scale, e.step) for e in steps] == [(1, i) for i in range(5)] + [(2, i) for i in range(last + 1)]
    assert [e.scale for e in seen if not isinstance(e, studio.Step)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00001-5.x1.latent.safetensors", "00001-5.x1.png"]
    progress = st.progress(fox(st))
    assert progress.evals[0] == steps[4].evals and progress.evals[1] == 4 * steps[6].evals == 4 * steps[-1].evals / last
    assert progress.steps == [4, 4]


def test_a_run_left_early_stops_and_the_next_waits_for_it(tiny_pipe, tiny_file, tmp_path, uploads,
                                                          monkeypatch):
    """A consumer that goes away (a cancelled API call, a closed page) cancels its run without waiting for it;
    the run keeps the device until its step is over, so the next run starts after it, not beside it."""
    st = studio.Studio(tiny_pipe, tiny_file, tmp_path, uploads)
    spans, generate = [], tiny_pipe.iter_generate

    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            yield from generate(*args, **kwargs)
        finally:
            spans.append((began, time.perf_counter()))

    monkeypatch.setattr(tiny_pipe, "iter_generate", timed)
    first = st.run(fox(st), threading.Event())
    for ev in first:
        if isinstance(ev, studio.Step) and ev.scale == 2:
            break
    first.close()
    assert [type(ev) for ev in st.run(fox(st, seed=6, width=256, height=256), threading.Event())] == \
        [studio.Step] * 5 + [studio.Finished]
    (a_began, a_ended), (b_began, _) = spans
    assert a_ended <= b_began
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00001-5.x1.png", "00002-6.png"]


def test_a_sessions_cancel_switch_lives_until_its_run_is_over_or_its_page_is_closed(tiny_pipe, tiny_file, tmp_path,
                                                                                    uploads):
    st = studio.Studio(tiny_pipe, tiny_file, tmp_path, uploads)
    armed = st.arm("page")
    assert st.switch("page") is armed
    st.release("page", armed)
    assert st._switches == {}
    again = st.arm("page")
    st.release("page", armed)  # an older run's end leaves the newer request's switch
    st.cancel("page")
    assert again.is_set()
    queued = st.arm("page")
    st.forget("page")  # the page closed: its queued run will not start
    assert queued.is_set() and st._switches == {}
    st.cancel("gone")
    st.forget("gone")


def test_a_runs_error_is_one_line_as_the_cli_words_it():
    settings = {"width": 4096, "height": 4096}
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
    assert studio.error_line(oom, settings) == ("out of memory even with one view per UNet call at 4096x4096; choose a "
                                            "smaller size or set a memory budget in the advanced settings")
    assert studio.error_line(ValueError("a.png: not an image\nmore"), settings) == "a.png: not an image"
    assert studio.error_line(KeyError("x"), settings) == "KeyError: 'x'"


def test_the_folders_beside_the_checkpoint_list_what_there_is_to_pick(tmp_path):
    weights = tmp_path / "sdxl.safetensors"
    weights.touch()
    for name in ("loras/a.safetensors", "loras/styles/B.safetensors", "loras/.hidden.safetensors", "loras/notes.txt",
                 "vae/fix.safetensors", "vae/fp16-fix/config.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    beside = folders.Folders.beside(weights)
    assert beside.lora == tmp_path / "loras" and beside.controlnet == tmp_path / "controlnet"
    assert beside.entries("lora") == ["a.safetensors", "styles/B.safetensors"]
    assert beside.entries("vae") == ["fix.safetensors", "fp16-fix"]
    assert beside.entries("controlnet") == []  # no such folder
    assert beside.path("lora", "styles/B.safetensors") == str(tmp_path / "loras" / "styles" / "B.safetensors")
    for name, message in (("../sdxl.safetensors", "not in the LoRA folder; put it there"),
                          (str(weights), "not in the LoRA folder; put it there"),
                          ("c.safetensors", "no such LoRA in the LoRA folder")):
        with pytest.raises(ValueError, match=message) as err:
            beside.path("lora", name)
        assert str(tmp_path) not in str(err.value).replace(name, "")
    # a diffusers checkpoint's vae/ is its own VAE, not a list of them
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae" / "config.json").touch()
    assert folders.Folders.beside(tmp_path).entries("vae") == ["fp16-fix"]
    assert folders.Folders.beside(tmp_path, lora=tmp_path / "vae").lora == tmp_path / "vae"


def test_embeddings_that_do_not_load_are_skipped_with_a_line_each(tmp_path, tiny_pipe):
    folder = tmp_path / "embeddings"
    (folder / "x").mkdir(parents=True)
    vectors = {"clip_l": torch.zeros(2, 64), "clip_g": torch.zeros(2, 128)}
    save_file(vectors, str(folder / "neggy.safetensors"))
    save_file(vectors, str(folder / "x" / "Neggy.safetensors"))  # the same word: prompts are lowercased
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(folder / "full_size.safetensors"))
    (folder / "old.pt").write_bytes(b"pickle")
    usable, skipped = folders.Folders.beside(tmp_path).embeddings(TINY, tiny_pipe.tokenizer.encode)
    assert usable == [str(folder / "neggy.safetensors")]
    assert len(skipped) == 3 and all("\n" not in line for line in skipped)
    assert "full_size.safetensors: clip_l is 2 x 768, not n x 64" in skipped[0]
    assert "old.pt: a pickled embedding" in skipped[1]
    assert "x/Neggy.safetensors: the same word as neggy.safetensors" in skipped[2]


def test_another_set_loads_the_pipeline_again_and_one_that_fails_leaves_the_one_before(tmp_path, tiny_pipe,
                                                                                   uploads, monkeypatch):
    """A reload lets the loaded pipeline go first; when the new set fails, the set before it is loaded again."""
    loaded = []

    class Loaded:
        def model_info(self):
            return {}

    def fake_load(path, device, dtype, loras, vae, embeddings, controlnet):
        loaded.append((loras, vae))
        if vae == "broken.safetensors":
            raise studio.CheckpointError("broken.safetensors: truncated\nmore")
        return Loaded()

    monkeypatch.setattr(studio, "load", fake_load)
    st = studio.Studio(tiny_pipe, Path("tiny.safetensors"), tmp_path, uploads)
    assert st.loaded == folders.Adapters() and list(st.use(folders.Adapters())) == [] and st.pipe is tiny_pipe
    styled = folders.Adapters(lora=(("/w/loras/style.safetensors", 0.7),), controlnet=("/w/controlnet/cn",))
    assert list(st.use(styled)) == [studio.Loading("LoRA style.safetensors at 0.7, ControlNet cn")]
    assert isinstance(st.pipe, Loaded) and st.loaded == styled
    with pytest.raises(studio.LoadError, match=r"^broken.safetensors: truncated; loaded LoRA style.safetensors at 0.7, "
                       r"ControlNet cn again$"):
        list(st.use(folders.Adapters(vae="broken.safetensors")))
    assert st.loaded == styled and isinstance(st.pipe, Loaded)
    assert loaded == [([("/w/loras/style.safetensors", 0.7)], None), ([], "broken.safetensors"),
                      ([("/w/loras/style.safetensors", 0.7)], None)]


def test_a_control_image_goes_with_a_controlnet_and_a_broken_vae_is_one_line(tmp_path, tiny_pipe, uploads):
    (tmp_path / "controlnet" / "cn").mkdir(parents=True)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    edges = uploaded(uploads.folder, "edges.png", Image.new("RGB", (64, 64)))
    st = studio.Studio(tiny_pipe, tmp_path, tmp_path, uploads)
    fox = {"prompt": "a fox", "height": 256, "width": 512}
    for values, field, message in (
            ({"controlnet": "cn"}, ("control_image",), "1 ControlNet but no Control image: give one image per "
             "ControlNet"),
            ({"control_image": edges}, ("control_image",), "Control image steers a ControlNet: give ControlNet too"),
            ({"controlnet": "cn", "control_image": edges, "control_start": 0.5, "control_end": 0.5},
             ("control_start", "control_end"), "Start 0.5 and End 0.5: the ControlNet acts from start to end of each "
             "scale's steps, so start must be below end"),
            ({"controlnet": "cn", "control_image": edges}, ("controlnet",), "cn: no ControlNet"),
            ({"lora": [("style.safetensors", 1.0)]}, ("lora",), "style.safetensors: no such LoRA in the LoRA folder"),
            ({"lora": [("../x.safetensors", 1.0)]}, ("lora",), "x.safetensors: not in the LoRA folder"),
            ({"vae": "broken.safetensors"}, ("vae",), "broken.safetensors: ")):
        with pytest.raises(studio.RequestError, match=re.escape(message)) as err:
            st.settings({**fox, **values})
        assert err.value.fields == field and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------- the limits

def test_what_this_server_runs_for_no_client_is_refused_at_once_with_its_limit():
    gib = 1 << 30
    limits = studio.Limits(max_size=1024, max_memory=8 * gib)
    fine = {"height": 512, "width": 1024, "lora": [("/w/loras/a.safetensors", -10.0)] * 8, "max_memory": 8 * gib}
    studio.check_limits(fine, limits)
    for change, field, message in (
            ({"width": 65536, "height": 65536}, ("height", "width"), "65536x65536 is over this server's limit of 1024 px a side; "
             "choose a smaller size"),
            ({"lora": [("/w/loras/a.safetensors", 1.0)] * 9}, "lora", "9 LoRAs: this server merges at most 8"),
            ({"lora": [("/w/loras/a.safetensors", 1e308)]}, "lora", "a.safetensors at 1e+308: a LoRA's weight must "
             "be from -10 to 10"),
            ({"lora": [("/w/loras/a.safetensors", float("nan"))]}, "lora", "a.safetensors at nan: "),
            ({"max_memory": int(1e30 * gib)}, "max_memory", "a budget of 1e+30 GiB is more than this server's device "
             "has (8.0 GiB); leave it blank for none")):
        with pytest.raises(studio.RequestError, match=re.escape(message)) as err:
            studio.check_limits({**fine, **change}, limits)
        assert err.value.fields == (field if isinstance(field, tuple) else (field,))


def test_the_size_limit_is_fixed_off_cuda_and_what_the_memory_model_fits_on_it(monkeypatch):
    cpu = studio.Limits.of(TINY, torch.device("cpu"), torch.float32)
    assert cpu.max_size == studio.FIXED_MAX_SIZE and cpu.max_pixels == studio.FIXED_MAX_SIZE ** 2
    assert cpu.max_memory == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert studio.Limits.of(TINY, torch.device("cpu"), torch.float32, 20000).max_pixels == Image.MAX_IMAGE_PIXELS
    # on a 2 GiB CUDA device: the largest square in whole scales that the CLI's check_fits lets through
    monkeypatch.setattr(request, "device_memory", lambda device: 2 << 30)
    cuda = torch.device("cuda")
    size = studio.Limits.of(TINY, cuda, torch.float16).max_size

    def fits(side):
        settings = {"height": side, "width": side, "steps": 1, "stride": WINDOW // 2, "guidance": 7.5, "strength": 1}
        try:
            request.check_fits(settings, TINY, cuda, torch.float16, resident(cuda))
        except SettingError:
            return False
        return True

    assert size % BASE == 0 and fits(size) and not fits(size + BASE)
