"""python -m minifusion.ui [--weights W] [--host 127.0.0.1] [--port 7860] [--outputs outputs/]

A web UI (Gradio, the optional extra minifusion[ui]) to keep open all day. The model loads once, at start.
Requests queue: one generation on the device at a time, the queue position shown. Each scale's image appears
as soon as it is decoded, with a progress bar per scale and an ETA for the whole run; "cancel" stops after the
current step and keeps the finished scales; "continue to a larger size" resumes from the last finished scale
(the CLI's --resume). What it keeps is written under the output folder: each scale's PNG with the CLI's
metadata (`minifusion --settings-from` reads it) and its latents, numbered as the CLI numbers them
(00001-<seed>.png, 00001-<seed>.x1.png, ...), and the pictures dropped in for image-to-image and as a control
image, re-encoded as PNG; the caches of the weights' hashes and of the memory model stay where the CLI keeps them
(~/.cache/minifusion). Uploads wait in a private temporary folder, removed when the server stops.

Beside the checkpoint, in the folders loras/, vae/, embeddings/ and controlnet/ inside the weights folder (or
next to the checkpoint file; --lora-dir, --vae-dir, --embeddings-dir, --controlnet-dir choose others): LoRAs
picked with a weight each, a VAE, a ControlNet with its control image (Canny edges optional, previewed at phase
1's size). Every embedding there loads at start, its file name a word prompts can use. These are load-time
choices: the pipeline is loaded again, in the queue, when a request asks for another set than the loaded one.

This module is the page (Gradio: its widgets, their events, the endpoint, the command line); what it drives, the
folders, runs, cancel switches and progress, is minifusion.studio, which knows nothing of Gradio.

The same generation is the API endpoint /generate (the CLI's names; LoRAs, VAE and ControlNet by their names in
those folders):

    from gradio_client import Client, handle_file
    pngs, info = Client("http://127.0.0.1:7860/").predict("a lighthouse", width=2048, height=2048,
                                                          lora=["style.safetensors:0.8"], api_name="/generate")
"""
import asyncio
import html
import inspect
import logging
import math
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from . import request
from .encode import base_scale_size
from .files import LatentFileError
from .lora import parse_spec
from .folders import shown_folder
from .settings import AUTOMATIC, BY_NAME, GENERATE, ROWS, SAMPLERS, SCHEDULES, SettingError, current_names
from .studio import (MAX_LORAS, Cancelled, Finished, Loading, RequestError, RunProgress, Step, Studio, canny_of,
                     check_size, duration, error_line, one_line)

log = logging.getLogger("minifusion")
OWN_VAE, NO_CONTROLNET = "the checkpoint's own", "none"  # the dropdowns' first choices
CHECKPOINTS = "the checkpoint's"  # the choice of a setting the checkpoint decides (prediction, zero-SNR)
TINY_NOTICE = ("**The tiny random model is loaded: its images are noise**, by construction, not a bug. They show "
               "that the whole pipeline runs, not what SDXL draws; start with `--weights` pointing at SDXL for "
               "pictures.")


def size_presets(base: int) -> dict[str, tuple[int, int]]:
    """Final sizes (width, height) for a model native at `base` px: squares of 2, 3 and 4 scales, and 2-scale
    landscape and portrait sizes at the usual aspect ratios, the short side rounded down to a multiple of 8."""
    presets = {}
    for s in (2, 3, 4):
        presets[f"{s * base} × {s * base} (1:1, {s} scales)"] = (s * base, s * base)
    for a, b in ((4, 3), (3, 2), (16, 9)):
        long, short = 2 * base, 2 * base * b // a // 8 * 8
        presets[f"{long} × {short} ({a}:{b})"] = (long, short)
        presets[f"{short} × {long} ({b}:{a})"] = (short, long)
    return presets

def status_html(text: str, kind: str = "info") -> str:
    """The page's one status line: `kind` info, done or error."""
    return f'<div class="mf-status mf-{kind}">{html.escape(text)}</div>'

def embeddings_html(studio: Studio) -> str:
    """The words the folder's embeddings add to prompts, and the files skipped, in small print."""
    words = ", ".join(f"<code>{html.escape(Path(p).stem)}</code>" for p in studio.embeddings) or "none"
    text = f"Embeddings in {html.escape(shown_folder(studio.folders.embedding))}/, words for the prompts: {words}"
    text += "".join(f"<br>skipped {html.escape(line)}" for line in studio.skipped)
    return f'<div class="mf-small">{text}</div>'


class Page:
    """The page's components, as the events wire them: `fields` the request's inputs by setting name (the LoRA
    weights as lora_weight_0, ...), the rest by what they are."""

    def __init__(self, **components):
        self.__dict__.update(components)

    @property
    def outputs(self) -> list:
        """What a run updates."""
        return [self.status, self.progress, self.gallery, self.slider, self.download, self.fields["seed"], self.last]


def build_app(studio: Studio, notice: str | None = None):
    """The page and the /generate endpoint, `notice` (markdown) at the top when it is open to anyone. Gradio is
    imported here, after main() has pointed its upload folder at the server's own (it reads GRADIO_TEMP_DIR when
    imported)."""
    import gradio as gr

    gr.set_static_paths([studio.outputs])  # the images are served from where they are, not copied for serving
    with gr.Blocks(title="minifusion", delete_cache=(86400, 86400)) as demo:
        # one token per page load: whose run the cancel button stops; a closed page's run is cancelled (a
        # function, not the bound method: Gradio deep-copies its config, and the method would copy the model)
        page = Page(token=gr.State(lambda: secrets.token_hex(8), delete_callback=lambda t: studio.forget(t)),
                    last=gr.State(None),  # the last finished scale: {"latents", "gallery", "before"}
                    picked=gr.State([]))  # the LoRAs the weight sliders are showing, in order
        gr.Markdown(f"## minifusion · DemoFusion on SDXL\n{studio.weights.name} on {studio.device} "
                    f"({str(studio.dtype).replace('torch.', '')}), base size {studio.base} px; images go to "
                    f"`{shown_folder(studio.outputs)}`")
        if notice:
            gr.Markdown(notice, elem_id="exposed")
        if studio.is_tiny:
            gr.Markdown(TINY_NOTICE, elem_id="tiny-notice")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                page.fields = _settings_form(studio, page)
                page.fields.update(_adapters_form(studio, page))
                with gr.Row():
                    page.run_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    page.cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
                page.continue_button = gr.Button("Continue to a larger size, from the last finished scale",
                                                 size="md", elem_id="continue")
            with gr.Column(scale=3, min_width=400):
                page.status = gr.HTML(status_html("ready"), elem_id="status")
                page.progress = gr.HTML(elem_id="progress")
                page.gallery = gr.Gallery(label="Scales, as each is decoded", columns=4, object_fit="contain",
                                          height=300, elem_id="gallery")
                page.slider = gr.ImageSlider(label="Before / after: the base scale (or your picture) against the "
                                             "last", type="filepath", elem_id="slider")
                page.download = gr.File(label="PNG of the last scale, with the settings in its metadata",
                                        elem_id="download")
        _run_events(studio, page, demo)
        _picker_events(studio, page)
        _api(studio)
    return demo


DEVICE = {"concurrency_id": "device", "concurrency_limit": 1}  # one generation on the device at a time


def field(name: str, **kwargs):
    """The page's widget for a setting, from its row: its label, default and range; a number the request works
    out when none is given (the view batch, the stride, eta) is a text box left blank (Gradio's number box sends
    0 for blank)."""
    import gradio as gr

    row = BY_NAME[name]
    kwargs = {"label": row.label, "elem_id": name.replace("_", "-"), **kwargs}
    if row.kind is bool:
        return gr.Checkbox(row.default, **kwargs)
    if row.kind in (int, float) and (row.default is not None or "value" in kwargs):
        finite = {k: v for k, v in (("minimum", row.low), ("maximum", row.high)) if v is not None and math.isfinite(v)}
        value = kwargs.pop("value", row.default)
        return gr.Number(value, precision=0 if row.kind is int else None, **{**finite, **kwargs})
    return gr.Textbox(**kwargs)


def _settings_form(studio: Studio, page: Page) -> dict:
    """The prompt, size, steps, seed, sampler, picture and DemoFusion's knobs, by their setting names."""
    import gradio as gr

    presets = size_presets(studio.base)
    default = next(iter(presets))
    fields = {"prompt": field("prompt", lines=3), "negative": field("negative", lines=2,
                                                                     placeholder="none: zero embeddings, as SDXL base")}
    page.presets = presets
    page.preset = gr.Dropdown(list(presets) + ["custom"], value=default, label="Size", elem_id="preset")
    with gr.Row():
        fields["width"] = field("width", value=presets[default][0], step=8)
        fields["height"] = field("height", value=presets[default][1], step=8)
    with gr.Row():
        fields["steps"] = field("steps")
        fields["guidance"] = field("guidance", step=0.5)
    with gr.Row():
        fields["seed"] = field("seed", value=-1)
        fields["random_seed"] = gr.Checkbox(True, label="a new random seed each run", elem_id="random-seed")
    with gr.Row():
        fields["sampler"] = field_choice("sampler", [(v, k) for k, v in SAMPLERS.items()], BY_NAME["sampler"].default)
        fields["schedule"] = field_choice("schedule", [(AUTOMATIC, AUTOMATIC.lower()),
                                                       *((v, k) for k, v in SCHEDULES.items())], AUTOMATIC.lower())
        fields["strength"] = gr.Slider(0, 1, value=BY_NAME["strength"].default, step=0.05,
                                       label=BY_NAME["strength"].label, elem_id="strength")
    with gr.Accordion("Image to image: upscale a picture", open=False, elem_id="img2img"):
        fields["image"] = _picture_field(label=BY_NAME["image"].label, elem_id="image")
    with gr.Accordion("Advanced: the sampler's and DemoFusion's knobs", open=False, elem_id="advanced"):
        with gr.Row():
            fields["timesteps"] = field("timesteps")
            fields["eta"] = field("eta")
            fields["guidance_rescale"] = field("guidance_rescale", step=0.05)
        with gr.Row():
            fields["prediction"] = field_choice("prediction", [(CHECKPOINTS, ""), ("eps", "epsilon"),
                                                               ("v", "v_prediction")], "")
            fields["zero_snr"] = field_choice("zero_snr", [(CHECKPOINTS, ""), ("yes", "yes"), ("no", "no")], "")
        with gr.Row():
            fields["view_batch"] = field("view_batch")
            fields["stride"] = field("stride", label=f"{BY_NAME['stride'].label} (blank: {studio.window // 2})")
        with gr.Row():
            for name in ("c1", "c2", "c3", "sigma"):
                fields[name] = field(name)
        with gr.Row():
            for name in ("tiled_decode", "jitter", "max_memory"):
                fields[name] = field(name)
    return fields


def field_choice(name: str, choices: list[tuple[str, str]], value: str):
    """A setting chosen from a list: (what the page shows, the value), under the setting's label."""
    import gradio as gr

    return gr.Dropdown(choices, value=value, label=BY_NAME[name].label, elem_id=name.replace("_", "-"))


def _picture_field(**kwargs):
    """An image field whose upload reaches the request unopened, as the path the client named: Gradio's Image
    opens that file itself (its header, or a FIFO that never ends) where studio.Uploads is to be the only reader
    of a client's files. Its preprocessing is replaced on the instance: for a subclass, Gradio would write a .pyi
    stub beside this module."""
    import gradio as gr

    # image_mode None: the file as dropped, which open_image reads as the CLI does (Gradio's default converts it
    # to RGB first, dropping transparency to black instead of white)
    field = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], **kwargs)
    field.preprocess = lambda payload: None if payload is None else payload.path
    return field


def _adapters_form(studio: Studio, page: Page) -> dict:
    """The LoRAs with a weight each, the VAE, the embeddings' words and the ControlNet with its picture, by
    their setting names."""
    import gradio as gr

    folders = studio.folders
    loras, vaes, nets = (folders.entries(k) for k in ("lora", "vae", "controlnet"))
    fields = {}
    with gr.Accordion("LoRA, VAE, embeddings", open=bool(loras or vaes), elem_id="models"):
        fields["lora"] = gr.Dropdown(loras, value=[], multiselect=True, max_choices=MAX_LORAS,
                                     label=BY_NAME["lora"].label, info=f"in {shown_folder(folders.lora)}/; merged "
                                     "into the weights: a change loads the checkpoint again at the next run",
                                     elem_id="lora")
        with gr.Row():
            page.lora_weights = [gr.Slider(-2, 2, value=1.0, step=0.05, visible=False, min_width=200,
                                           elem_id=f"lora-weight-{i}") for i in range(MAX_LORAS)]
        fields.update({f"lora_weight_{i}": w for i, w in enumerate(page.lora_weights)})
        fields["vae"] = gr.Dropdown([OWN_VAE, *vaes], value=OWN_VAE, label=BY_NAME["vae"].label,
                                    info=f"in {shown_folder(folders.vae)}/", elem_id="vae")
        with gr.Row(equal_height=True):
            page.embeddings = gr.HTML(embeddings_html(studio), elem_id="embeddings")
            page.rescan = gr.Button("↻ Rescan the folders", size="sm", scale=0, min_width=170, elem_id="rescan")
    with gr.Accordion("ControlNet", open=False, elem_id="control"):
        fields["controlnet"] = gr.Dropdown([NO_CONTROLNET, *nets], value=NO_CONTROLNET, label=BY_NAME["controlnet"].label,
                                           info=f"in {shown_folder(folders.controlnet)}/", elem_id="controlnet")
        with gr.Row():
            fields["control_image"] = _picture_field(label=BY_NAME["control_image"].label, height=260,
                                                     elem_id="control-image")
            page.canny_preview = gr.Image(label="Canny edges", interactive=False, visible=False, height=260,
                                          format="png", elem_id="canny-preview")
        with gr.Row():
            fields["canny"] = field("canny", info="thresholds 100/200, at phase 1's size: what the ControlNet gets")
            fields["guess_mode"] = field("guess_mode")
        fields["control_scale"] = slider("control_scale", 0, 2)
        with gr.Row():
            fields["control_start"] = slider("control_start", 0, 1)
            fields["control_end"] = slider("control_end", 0, 1)
    return fields


def slider(name: str, low: float, high: float):
    """A setting's slider over the part of its range the page offers."""
    import gradio as gr

    row = BY_NAME[name]
    return gr.Slider(low, high, value=row.default, step=0.05, label=row.label, elem_id=name.replace("_", "-"))


def _validations(error: RequestError | None, names) -> list:
    """One gr.validate per input, the error on each it is about (both width and height for a size)."""
    import gradio as gr

    def about(name):
        return error is not None and name in error.fields
    return [gr.validate(not about(n), str(error) if about(n) else "") for n in names]


def _request(page: Page, values) -> dict:
    """The page's values as the API takes them: the LoRAs (name, weight) in the order picked, no VAE for the
    checkpoint's own, the control image and Canny only with a ControlNet."""
    values = dict(zip(page.fields, values))
    values["lora"] = [(name, values[f"lora_weight_{i}"]) for i, name in enumerate(values["lora"] or [])]
    values["vae"] = None if values["vae"] == OWN_VAE else values["vae"]
    values["zero_snr"] = {"yes": True, "no": False}.get(values["zero_snr"])
    if values.pop("random_seed"):
        values["seed"] = None  # drawn when the request is resolved, and shown in the field
    if values["controlnet"] == NO_CONTROLNET:
        values.update(controlnet=None, control_image=None, canny=False)
    return values


def _show(studio: Studio, page: Page, events: Iterator, progress: RunProgress, settings: dict, shown: list,
          before: str | None):
    """Page updates from a run's events: every step moves its bar, every finished scale joins the gallery, the
    slider and the download; the last line says how it ended."""
    final, loading, loaded = None, None, ""
    running = status_html(f"running: {settings['width']}x{settings['height']}, seed {settings['seed']}")
    yield {page.status: running, page.progress: progress.html(), page.gallery: list(shown),
           page.fields["seed"]: settings["seed"]}
    try:
        for ev in events:
            if isinstance(ev, Loading):
                loading = (ev.what, time.perf_counter())
                yield {page.status: status_html(f"loading: {ev.what}")}
                continue
            if loading is not None:  # loaded: the run's clock, which the ETA reads, starts now
                progress.started = time.perf_counter()
                loaded = f" (after loading {loading[0]} in {duration(progress.started - loading[1])})"
                loading = None
                yield {page.status: running}
            if isinstance(ev, Step):
                progress.step(ev)
                yield {page.progress: progress.html()}
                continue
            progress.finish(ev)
            shown.append((str(ev.png), f"scale {ev.scale} · {ev.size[0]}×{ev.size[1]}"))
            before, final = before or str(ev.png), ev
            kept = {"latents": str(ev.latents), "gallery": list(shown), "before": before}
            yield {page.progress: progress.html(), page.gallery: list(shown), page.slider: (before, str(ev.png)),
                   page.download: str(ev.png), page.last: kept}
        line = status_html(f"done: {final.size[0]}x{final.size[1]} in "
                           f"{duration(time.perf_counter() - progress.started)}{loaded}, saved as "
                           f"{final.png.name}", "done")
    except Cancelled as e:
        progress.ended = "cancelled"
        line = status_html(f"{e}; kept {len(shown)} finished scale(s)" if shown else str(e))
    except Exception as e:  # the app keeps serving: one line in the page, the traceback on the console
        progress.ended = "failed"
        log.error("the run failed", exc_info=e)
        line = status_html(f"error: {studio.for_clients(error_line(e, settings))}", "error")
    yield {page.status: line, page.progress: progress.html()}


def _run_events(studio: Studio, page: Page, demo) -> None:
    """Generate, continue and cancel: a click arms the session's cancel switch, then queues the run behind the
    validation of its request."""
    fields = page.fields

    def validate(token, *values):
        try:
            studio.settings(_request(page, values))
        except RequestError as e:
            return _validations(e, ["token", *fields])
        return _validations(None, ["token", *fields])

    def page_generate(token, *values):
        settings = studio.settings(_request(page, values))
        before = None if settings["image"] is None else str(settings["image"].path)
        switch = studio.switch(token)
        try:
            yield from _show(studio, page, studio.run(settings, switch),
                             studio.progress(settings, 1 if before is None else 2), settings, [], before)
        finally:
            studio.release(token, switch)

    def validate_continue(token, last, width, height):
        try:
            studio.resume((last or {}).get("latents"), height, width)
        except (RequestError, LatentFileError) as e:
            error = e if isinstance(e, RequestError) else RequestError(("width", "height"),
                                                                       studio.for_clients(str(e)))
            return _validations(error, ["token", "last", "width", "height"])
        return _validations(None, ["token", "last", "width", "height"])

    def page_continue(token, last, width, height):
        # its own settings, LoRAs, VAE, ... and control image included: the pipeline reloads if need be
        saved, settings = studio.resume(last["latents"], height, width)
        switch = studio.switch(token)
        try:
            yield from _show(studio, page, studio.run(settings, switch, saved),
                             studio.progress(settings, saved.scale + 1), settings, list(last["gallery"]),
                             last["before"])
        finally:
            studio.release(token, switch)

    def arm(token):
        studio.arm(token)

    page.run_button.click(arm, page.token, None, queue=False, api_visibility="private").then(
        page_generate, [page.token, *fields.values()], page.outputs, validator=validate,
        show_progress_on=[page.progress], api_visibility="private", **DEVICE)
    page.continue_button.click(arm, page.token, None, queue=False, api_visibility="private").then(
        page_continue, [page.token, page.last, fields["width"], fields["height"]], page.outputs,
        validator=validate_continue, show_progress_on=[page.progress], api_visibility="private", **DEVICE)
    page.cancel_button.click(studio.cancel, page.token, None, queue=False, api_visibility="private")


def _picker_events(studio: Studio, page: Page) -> None:
    """What follows a pick on the page at once, outside the queue: a size preset or a dropped picture sets the
    size, picked LoRAs get their weight sliders, the folders are read again, the Canny edges are previewed."""
    import gradio as gr

    fields, base = page.fields, studio.base
    width, height, image, lora = fields["width"], fields["height"], fields["image"], fields["lora"]

    def pick_preset(choice):
        if choice not in page.presets:
            return gr.skip(), gr.skip()
        return page.presets[choice]

    def size_of_picture(path):
        """A dropped picture sets the size to 2 x base on its longer side, or its own rounded up to whole scales,
        keeping its aspect (the CLI's default for --image), within the server's limit."""
        if not path:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            picture = studio.uploads.open(path)
        except ValueError:  # ImageError: not a picture this server reads
            return gr.skip(), gr.skip(), gr.skip()
        h, w = base_scale_size(*picture.size, base).final
        if max(h, w) > studio.limits.max_size:  # the largest this server runs, at the picture's aspect
            longer = "width" if w >= h else "height"
            h, w = base_scale_size(*picture.size, base, **{longer: studio.limits.max_size // 8 * 8}).final
        return w, h, "custom"

    def pick_loras(names, before, *weights):
        """One weight slider per picked LoRA, in the order picked; a LoRA keeps its weight while others come
        and go."""
        names = names or []
        kept = dict(zip(before, weights))
        return [gr.Slider(visible=True, label=f"{names[i]} weight", value=kept.get(names[i], 1.0))
                if i < len(names) else gr.Slider(visible=False) for i in range(MAX_LORAS)] + [list(names)]

    def rescan_folders(names, vae_name, net):
        """The folders read again: the dropdowns list what is there now (a choice whose file is gone falls back
        to none), and the embeddings are checked again."""
        studio.rescan()
        loras, vaes, nets = (studio.folders.entries(k) for k in ("lora", "vae", "controlnet"))
        return (gr.Dropdown(choices=loras, value=[n for n in names or [] if n in loras]),
                gr.Dropdown(choices=[OWN_VAE, *vaes], value=vae_name if vae_name in vaes else OWN_VAE),
                gr.Dropdown(choices=[NO_CONTROLNET, *nets], value=net if net in nets else NO_CONTROLNET),
                embeddings_html(studio))

    def preview_canny(path, on, width, height):
        """The edges the ControlNet will see: the CLI's --canny at phase 1's size for the size asked for (kept
        as it is while that size is not a valid one)."""
        if not (path and on):
            return gr.Image(value=None, visible=False)
        try:
            request.check_size(int(height), int(width), base)
            check_size(int(height), int(width), studio.limits)
        except (SettingError, RequestError, TypeError):
            return gr.skip()
        try:
            edges = canny_of(studio.uploads, studio.uploads.open(path), int(height), int(width), base)
        except (ValueError, ImportError) as e:  # ImageError included
            return gr.Image(value=None, visible=True, label=f"Canny edges: {one_line(e)}")
        return gr.Image(value=edges, visible=True, label=f"Canny edges, {edges.width}×{edges.height}")

    private = {"queue": False, "api_visibility": "private"}
    lora.change(pick_loras, [lora, page.picked, *page.lora_weights], [*page.lora_weights, page.picked], **private)
    page.rescan.click(rescan_folders, [lora, fields["vae"], fields["controlnet"]],
                      [lora, fields["vae"], fields["controlnet"], page.embeddings], **private)
    control_image, use_canny = fields["control_image"], fields["canny"]
    gr.on([control_image.change, use_canny.change, width.change, height.change], preview_canny,
          [control_image, use_canny, width, height], page.canny_preview, show_progress="hidden", **private)
    page.preset.change(pick_preset, page.preset, [width, height], **private)
    gr.on([width.input, height.input], lambda: "custom", None, page.preset, **private)
    image.change(size_of_picture, image, [width, height, page.preset], **private)


API_MODEL = ("lora", "vae", "controlnet")  # the load-time settings a request names, from the app's folders


def api_parameters() -> list[inspect.Parameter]:
    """/generate's parameters, from the table: the command line's names, each setting's default (None where the
    request works it out), pictures as uploaded files, the LoRAs as "NAME:WEIGHT" texts; a setting's older name
    too (scheduler=)."""
    from gradio import FileData

    params, older = [], []
    for row in ROWS:
        if row.part != GENERATE and row.name not in API_MODEL:
            continue
        # one picture, ControlNet and value each (the page steers one ControlNet); text typed as on the command line
        kind = (FileData if row.name in request.PICTURES else list[str] if row.name == "lora" else
                row.kind if row.kind in (int, float, bool) else str)
        default = inspect.Parameter.empty if row.name == "prompt" else None if row.resolved else row.default
        default = None if isinstance(default, list) else default
        params.append(inspect.Parameter(row.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                        annotation=kind if default is inspect.Parameter.empty else kind | None))
        if row.older:
            older.append(inspect.Parameter(row.older, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                           annotation=str | None))
    return params + older


def _api(studio: Studio) -> None:
    """/generate: the page's run for gradio_client, under the command line's names (api_parameters)."""
    import gradio as gr
    from gradio import FileData

    signature = inspect.Signature(api_parameters(), return_annotation=tuple[list[FileData], dict])

    async def api_generate(*args, **kwargs):
        values = signature.bind(*args, **kwargs)
        values.apply_defaults()
        values = dict(values.arguments)
        lora = values["lora"]
        if not isinstance(lora or [], list) or not all(isinstance(spec, str) for spec in lora or []):
            raise gr.Error('lora: a list of "NAME:WEIGHT"', print_exception=False)
        try:
            values = current_names(values)  # scheduler= is sampler=
            values["lora"] = [parse_spec(spec) for spec in lora or []]
            settings = await asyncio.to_thread(studio.settings, values)
        except (RequestError, ValueError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        cancel = threading.Event()
        run = asyncio.ensure_future(asyncio.to_thread(_finished, studio.run(settings, cancel)))
        try:
            done = await asyncio.shield(run)
        except asyncio.CancelledError:  # the client cancelled: the run stops after its step, holding the queue
            cancel.set()                # until then, so that the next request does not share the device with it
            await asyncio.gather(run, return_exceptions=True)
            raise
        except Exception as e:
            log.error("the run failed", exc_info=e)
            raise gr.Error(studio.for_clients(error_line(e, settings)), print_exception=False) from None
        return ([FileData(path=str(ev.png)) for ev in done],
                {"settings": studio.for_clients(done[-1].settings), "scales": [
                    {"scale": ev.scale, "width": ev.size[0], "height": ev.size[1], "seconds": ev.seconds,
                     "latents": ev.latents.name} for ev in done]})

    api_generate.__signature__ = signature
    api_generate.__annotations__ = {**{p.name: p.annotation for p in signature.parameters.values()},
                                    "return": signature.return_annotation}
    api_generate.__doc__ = ("Generate: the PNG of every scale (base scale first, each with the settings in its "
                            "metadata) and a summary (the settings used, files by their names in the app's folders; "
                            "per scale its size, seconds and latents file). Arguments as the command line's flags "
                            "(minifusion --help): left out, a setting takes its default; seed None or -1 draws one; "
                            "image upscales a picture (gradio_client.handle_file); lora [\"NAME:WEIGHT\", ...], vae "
                            "and controlnet by their names in the app's folders (as the page lists them), "
                            "control_image the ControlNet's picture, canny its edges.")
    gr.api(api_generate, api_name="generate", **DEVICE)


def _finished(events: Iterator) -> list[Finished]:
    return [ev for ev in events if isinstance(ev, Finished)]


CSS = """
.mf-status { font-weight: 600; padding: 4px 0; }
.mf-error { color: #c62828; }
.mf-done { color: #2e7d32; }
.mf-progress .mf-eta { margin-bottom: 4px; }
.mf-scale { display: flex; gap: 8px; align-items: center; }
.mf-scale .mf-name { min-width: 11em; }
.mf-scale progress { flex: 1; height: 12px; }
.mf-scale .mf-state { width: 11em; text-align: right; }
.mf-small { font-size: 0.85em; opacity: 0.8; }
/* a refusal above its field, not over it (Gradio lays it over the field's top, where a slider's value is): the
   field stays in sight and in reach while it is being fixed */
.wrap:has(> .validation-error) { position: static !important; overflow: visible !important; background: none !important; }
.wrap > .validation-error { position: static !important; }
"""


if __name__ == "__main__":  # python -m minifusion.ui: the server's command line is minifusion.app's
    from minifusion.app import main
    sys.exit(main())
