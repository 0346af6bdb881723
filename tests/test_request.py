"""The one table of settings (minifusion.settings) and the request rules (minifusion.request), without a model:
every front end's names come from one row, errors carry the setting they are about, and what the front ends
make from the table (the command line's flags, the README's flag table, the PNG reader) agrees with it."""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minifusion import metadata, request
from minifusion.__main__ import parser
from minifusion.files import SavedScale
from minifusion.settings import (BY_API, BY_NAME, LOAD, RECORDED, REQUEST, ROWS, RUN, SettingError, check, cli_word,
                                 defaults)
from minifusion.tiny import TINY

README = Path(__file__).resolve().parents[1] / "README.md"


def resolve(**values):
    return request.resolve({"prompt": "a fox", **values}, TINY)


def worded(e: SettingError) -> str:
    return e.worded(cli_word)


def test_every_row_is_named_once_in_every_front_end():
    assert len({s.name for s in ROWS}) == len(ROWS)
    assert len({s.api for s in ROWS if s.api}) == len([s for s in ROWS if s.api])
    assert len({s.a1111 for s in ROWS if s.a1111}) == len([s for s in ROWS if s.a1111])
    options = [a.option_strings for a in parser()._actions if a.option_strings]
    flags = {f for fs in options for f in fs} - {"-h", "--help", "--version"}
    older = {"--" + s.older.replace("_", "-") for s in ROWS if s.older}
    assert flags == {s.option for s in ROWS if s.name != "prompt"} | older and older == {"--scheduler"}


def test_the_command_lines_defaults_and_help_come_from_the_rows():
    ap = parser()
    actions = {a.dest: a for a in ap._actions}
    for s in ROWS:
        if s.name == "prompt":
            continue
        a = actions[s.name]
        assert a.help.startswith(s.described(cli_word)), s.name
        # a recorded setting not given stays None (a PNG's or a resumed run's value may fill it); a run's own
        # flags default to their row's
        assert a.default == (s.default if s.part == RUN else None), s.name
        if s.choices:
            assert tuple(a.choices) == s.choices
    assert "(default 50)" in actions["steps"].help and "(default 7.5)" in actions["guidance"].help


def test_the_readme_flag_table_agrees_with_the_rows():
    """Every flag of the command line is in the README's table, with its row's default."""
    text = README.read_text()
    table = [line for line in text.splitlines() if line.startswith("| `--")]
    shown = {}
    for line in table:
        flags_cell, default_cell = [c.strip() for c in line.strip("|").split("|")[:2]]
        flags = re.findall(r"`(--[a-z0-9-]+)", flags_cell)
        defaults_ = [d.strip() for d in default_cell.split(",")] if "," in default_cell else [default_cell] * len(flags)
        for flag, default in zip(flags, defaults_):
            shown[flag] = default
    for s in ROWS:
        if s.name == "prompt":
            continue
        assert s.option in shown, f"{s.option} is not in the README's flag table"
        if s.default is not None and s.kind in (int, float) and not s.resolved:
            assert shown[s.option] == f"{s.default:g}", (s.option, shown[s.option])


def test_values_are_checked_by_their_row_and_named_by_each_front_end():
    with pytest.raises(SettingError) as e:
        check("steps", 0)
    assert e.value.names == ("steps",)
    assert str(e.value) == "num_inference_steps 0 is invalid; it must be an integer from 1 to 1000"
    assert worded(e.value) == "--steps 0 is invalid; it must be an integer from 1 to 1000"
    assert e.value.worded(lambda s: s.label) == "Steps per scale 0 is invalid; it must be an integer from 1 to 1000"
    for name, bad in [("guidance", math.nan), ("sigma", 0.0), ("c1", -1.0), ("view_batch", 0), ("seed", -2),
                      ("seed", 2 ** 64), ("steps", 2.5), ("steps", True), ("jitter", "yes"), ("guidance_rescale", 1.5), ("strength", 0.0)]:
        with pytest.raises(SettingError):
            check(name, bad)
    for name, good in [("guidance", 0.0), ("sigma", 1e-3), ("seed", -1), ("seed", 2 ** 64 - 1), ("steps", 1000)]:
        check(name, good)


def test_a_bad_size_names_both_sides_or_the_side():
    with pytest.raises(SettingError) as e:
        resolve(height=500)
    assert e.value.names == ("height",) and "500 is not a multiple of 8; pick e.g. 496" in worded(e.value)
    with pytest.raises(SettingError) as e:
        resolve(width=0)
    assert worded(e.value).startswith("--width 0 is invalid")  # 0 is not "blank": it never falls back
    with pytest.raises(SettingError) as e:
        resolve(height=128, width=128)
    assert e.value.names == ("height", "width") and "below this model's base size" in str(e.value)


def test_defaults_that_depend_on_the_model():
    r = resolve()
    base, window = TINY.unet.sample_size * 8, TINY.unet.sample_size
    assert (r.settings["height"], r.settings["width"], r.settings["stride"]) == (2 * base, 2 * base, window // 2)
    assert r.sizes == [(32, 32), (64, 64)] and r.first == 1
    with pytest.raises(SettingError) as e:
        resolve(stride=window + 1)
    assert worded(e.value) == f"--stride {window + 1} is invalid; it must be an integer from 1 to the window size, 32"


def test_the_seed_is_drawn_when_none_is_given_and_kept_when_one_is():
    a, b = resolve(), resolve(seed=-1)
    assert a.drawn and b.drawn and 0 <= a.settings["seed"] < 2 ** 32
    assert resolve(seed=7).settings["seed"] == 7 and not resolve(seed=7).drawn


@pytest.mark.parametrize("values,names,fragment", [
    ({"control_start": 0.8, "control_end": 0.2, "control_image": "c.png"}, ("control_start", "control_end"),
     "start must be below end"),
    ({"control_start": 0.5, "control_end": 0.5, "control_image": "c.png"}, ("control_start", "control_end"),
     "start must be below end"),
    ({"control_start": 1.5, "control_image": "c.png"}, ("control_start",), "1.5 is invalid"),
    ({"control_scale": 0.5}, ("control_scale",), "steers a ControlNet"),
    ({"canny": True}, ("canny",), "steers a ControlNet"),
    ({"control_end": 0.2}, ("control_end",), "steers a ControlNet"),
])
def test_controlnet_rules_hold_with_or_without_a_controlnet(values, names, fragment):
    with pytest.raises(SettingError) as e:
        request.resolve({"prompt": "a fox", **values}, TINY, controlnets=1, paired=True)
    assert e.value.names == names and fragment in str(e.value)
    if "control_image" not in values:  # the same refusal where no ControlNet is loaded at all
        with pytest.raises(SettingError):
            resolve(**values)


def test_controlnet_pairing():
    with pytest.raises(SettingError, match="2 controlnet but 1 control_image"):
        request.resolve({"prompt": "x", "control_image": ["a.png"]}, TINY, controlnets=2, paired=True)
    with pytest.raises(SettingError) as e:
        request.resolve({"prompt": "x"}, TINY, controlnets=1, paired=True)
    assert worded(e.value) == "1 --controlnet but no --control-image: give one image per ControlNet"
    assert request.resolve({"prompt": "x"}, TINY, controlnets=1).settings["control_image"] is None  # may idle
    with pytest.raises(SettingError, match="control_image steers a ControlNet"):
        resolve(control_image="a.png")


def test_a_resumed_run_must_gain_scales_at_its_aspect():
    saved = SavedScale(2, torch.zeros(1, 4, 64, 64), 0.0, 1.0, None, {})
    assert request.resolve({"prompt": "x", "height": 768, "width": 768}, TINY, resume=saved).first == 3
    with pytest.raises(SettingError, match="already reached scale 2"):
        request.resolve({"prompt": "x", "height": 512, "width": 512}, TINY, resume=saved)
    with pytest.raises(SettingError, match="keep the aspect ratio"):
        request.resolve({"prompt": "x", "height": 768, "width": 1024}, TINY, resume=saved)



def test_a_resumed_run_keeps_its_sampling_under_either_name():
    """A latents file written before the sampler had its name records it as scheduler."""
    for saved_settings in ({"scheduler": "euler"}, {"sampler": "dpmpp_2m", "schedule": "karras"}):
        saved = SavedScale(2, torch.zeros(1, 4, 64, 64), 0.0, 1.0, None, saved_settings)
        s = request.resolve({"prompt": "x", "height": 768, "width": 768}, TINY, resume=saved).settings
        assert {k: s[k] for k in saved_settings.keys() - {"scheduler"}} == \
            {k: v for k, v in saved_settings.items() if k != "scheduler"}
        assert s["sampler"] == saved_settings.get("sampler", saved_settings.get("scheduler"))
    told = request.resolve({"prompt": "x", "height": 768, "width": 768, "sampler": "ddim"}, TINY, resume=saved)
    assert (told.settings["sampler"], told.settings["schedule"]) == ("ddim", "leading")


def test_generate_keywords_map_to_settings_and_unknown_ones_name_the_right_one():
    assert request.from_api("p", {"num_inference_steps": 3, "multi_decoder": False}) == {
        "prompt": "p", "steps": 3, "tiled_decode": False}
    with pytest.raises(TypeError, match=r"'steps' \(did you mean num_inference_steps\?\)"):
        request.from_api("p", {"steps": 3})
    with pytest.raises(TypeError, match="'weights'"):  # load()'s, not generate()'s
        request.from_api("p", {"weights": "x"})
    assert request.api_kwargs({"steps": 3, "c1": 2.0, "canny": True, "prompt": "p"}) == {
        "num_inference_steps": 3, "cosine_scale_1": 2.0}


def test_memory_budgets_in_bytes_or_text():
    assert resolve(max_memory="8GiB").settings["max_memory"] == 8 << 30
    assert resolve(max_memory="8").settings["max_memory"] == 8 << 30  # a plain number as text: GiB
    assert resolve(max_memory=8 << 30).settings["max_memory"] == 8 << 30  # a number: bytes
    for bad in ("lots", "-1GiB", "1e30GiB"):
        with pytest.raises(SettingError) as e:
            resolve(max_memory=bad)
        assert e.value.names == ("max_memory",) and "\n" not in str(e.value)


def test_the_png_reader_reads_every_recorded_setting_back(tmp_path):
    settings = {**defaults(RECORDED), "prompt": "a fox", "height": 512, "width": 256, "seed": 3, "stride": 16,
                "view_batch": 4, "steps": 7, "sampler": "dpmpp_2m_sde", "schedule": "karras", "eta": 0.5,
                "guidance_rescale": 0.7, "strength": 0.5, "max_memory": 8 << 30}
    text = metadata.a1111_parameters(settings, (256, 512), 2, 2, {"name": "m", "hash": "0123456789"})
    assert "Sampler: DPM++ 2M SDE, Schedule type: Karras" in text and "Denoising strength: 0.5" in text
    back = metadata.settings_from_a1111(metadata.parse_a1111(text))
    for s in ROWS:
        if s.a1111 and settings.get(s.name) is not None:
            assert back[s.name] == settings[s.name], s.name
    explicit = {**settings, "schedule": None, "timesteps": [999, 749, 499, 249], "sampler": "lcm", "eta": None}
    text = metadata.a1111_parameters(explicit, (256, 512), 2, 2, {})
    assert metadata.settings_from_a1111(metadata.parse_a1111(text))["timesteps"] == [999, 749, 499, 249]
    # the defaults go unsaid, as Automatic1111 leaves them out: the paper's run reads as it always did
    plain = metadata.a1111_parameters({**defaults(RECORDED), "prompt": "p", "height": 512, "width": 512, "seed": 1,
                                       "sampler": "ddim", "schedule": "leading", "eta": 0.0}, (512, 512), 2, 2, {})
    assert "Schedule type" not in plain and "Eta" not in plain and "Denoising" not in plain and "Rescale" not in plain
    # older A1111 texts: a combined sampler name gives the schedule too
    old = metadata.settings_from_a1111(metadata.parse_a1111("p\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7"))
    assert (old["sampler"], old["schedule"]) == ("dpmpp_2m", "karras")
    assert set(RECORDED) == set(REQUEST) | {s.name for s in ROWS if s.part == LOAD} - {"device", "dtype"}


def test_help_and_version_do_not_import_torch():
    code = ("import sys\nfrom minifusion.__main__ import main\n"
            "for a in (['--version'], ['--help']):\n    try:\n        main(a)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "minifusion 0.2.0" in done.stdout and "--steps STEPS" in done.stdout


def test_every_api_setting_is_a_generate_keyword():
    assert {s.api for s in ROWS if s.part == "generate" and s.api} == {k for k in BY_API if BY_API[k].name in REQUEST}
    assert BY_NAME["steps"].api == "num_inference_steps"
