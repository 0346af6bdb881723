"""What kind of model file this is, so that a wrong file gets a name rather than a list of 2000 missing keys.

The checkpoint, LoRA, VAE and ControlNet loaders each refuse what is not theirs; the recognition is here, as data:
tables of `Family` (a regular expression over tensor names, and the name a message gives) and `identify`, which
finds the first family of a table a file's names belong to. Key names are as the releases carry them:
v1-5-pruned (SD 1.x), v2-1_768-ema-pruned (SD 2.x), sd_xl_refiner_1.0, sd3_medium, flux1-dev (bare, and
ComfyUI's model.diffusion_model. repack), diffusers transformers, and LoRAs in the kohya-ss, LyCORIS, diffusers
and PEFT namings; diffusers' CHECKPOINT_KEY_NAMES and ComfyUI use the same markers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from .safetensors_check import show

# pickle formats are never opened (unpickling can run code): files with these suffixes are refused by name
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Family:
    name: str  # what the file is, as every loader's message says it: "a Flux checkpoint"
    keys: str  # a regular expression searched in each tensor name
    every: bool = False  # every name must match (a file of one part); otherwise one is enough
    note: str = ""  # what the checkpoint loader's message adds after the name: why, or what to pass instead
    classes: tuple[str, ...] = ()  # the diffusers `_class_name`s of a folder of this family

    def __str__(self) -> str:
        return self.name + self.note


def identify(names: Iterable[str], table: list[Family]) -> Family | None:
    """The first family of `table` that `names` (a file's tensor names) belong to, or None."""
    names = list(names)
    for family in table:
        rx = re.compile(family.keys)
        found = (rx.search(n) for n in names)
        if all(found) if family.every else any(found):
            return family
    return None


def of_class(class_name: str, table: list[Family]) -> Family | None:
    """The family of `table` whose diffusers folders have this `_class_name` (config.json's), or None."""
    return next((family for family in table if class_name in family.classes), None)


_FULL = " (minifusion needs the full checkpoint: UNet, VAE and both text encoders)"
_NOTHING = r"(?!)"  # matches no name: a table's row for a file without tensors, when it asks for every name

# Whole checkpoints and the parts of one, as the checkpoint loader names them (the other loaders name them too).
# Order matters: a LoRA names the layers of the model it patches, so it is tested first; Flux before SD3, since an
# all-in-one Flux file also carries the T5 encoder SD3 uses; the parts (every key matches) last.
CHECKPOINTS = [
    Family("an empty safetensors file", _NOTHING, every=True, note=" (it holds no tensors)"),
    Family("a LoRA / LyCORIS adapter",
           r"^(lora_(unet|te\d?|transformer)_|lycoris_)|\.(lora_(down|up|A|B)|lora\.(down|up)|lora_magnitude_vector)\."
           r"|_lora\.(down|up)\.|\.(hada_w[12]_[ab]|lokr_w[12](_[ab])?)$",
           note=" (an add-on that patches a base model, not a model itself)"),
    Family("a Flux checkpoint",
           r"^(model\.diffusion_model\.)?(double|single)_blocks\.\d|^(transformer\.)?single_transformer_blocks\.\d"),
    Family("a Stable Diffusion 3 checkpoint", r"^(model\.diffusion_model\.)?joint_blocks\.\d"),
    Family("a Stable Diffusion 3 transformer", r"^(transformer\.)?transformer_blocks\.\d+\.attn\.add_q_proj\.",
           note=" (diffusers layout)"),
    Family("a Stable Diffusion 1.x checkpoint", r"^cond_stage_model\.transformer\."),
    Family("a Stable Diffusion 2.x checkpoint", r"^cond_stage_model\.model\."),
    # the refiner conditions on bigG alone, which it keeps in the first embedder slot (the base has CLIP-L there)
    Family("an SDXL refiner checkpoint", r"^conditioner\.embedders\.0\.model\.",
           note=" (minifusion needs the SDXL base model)"),
    Family("Playground v2.5", r"^edm_(mean|std)$",
           note=" (SDXL's architecture trained for the EDM noise schedule, which minifusion does not run)"),
    Family("a VAE on its own", r"^(first_stage_model\.|vae\.)?(encoder|decoder|quant_conv|post_quant_conv)\.",
           every=True, note=_FULL),
    Family("a UNet on its own", r"^model\.diffusion_model\.", every=True, note=_FULL),
    Family("the UNet file of a diffusers-layout folder",
           r"^(conv_in|conv_out|conv_norm_out|time_embedding|add_embedding|down_blocks|up_blocks|mid_block)\.",
           every=True, note="; pass the folder (the one holding model_index.json) instead"),
    Family("a CLIP text encoder on its own",
           r"^(text_model\.|text_projection|logit_scale$|transformer\.resblocks\.|token_embedding\."
           r"|positional_embedding$|ln_final\.)", every=True, note=" (minifusion needs the full checkpoint)"),
    Family("a textual-inversion embedding", r"^(clip_[lg]|emb_params|string_to_param\..+|string_to_token\..+)$",
           every=True, note=" (an add-on to a prompt, not a model)"),
    Family("a minifusion latents file", r"^(latents|generator_state)$", every=True,
           note=" (a finished scale of a run: continue it with --resume, not --weights)"),
]

# Diffusers pipeline folders, by the prefix of model_index.json's `_class_name`, SDXL's own excepted.
PIPELINES = [("StableDiffusion3", "Stable Diffusion 3"), ("Flux", "Flux"),
             ("StableDiffusion", "Stable Diffusion 1.x / 2.x")]


def pipeline_family(index: dict) -> str | None:
    """A human name for a diffusers folder that is not SDXL base, from its model_index.json, or None."""
    cls = index.get("_class_name")
    if not isinstance(cls, str):
        return None
    if cls.startswith("StableDiffusionXL"):
        # the refiner's index marks it so, and has no CLIP-L text encoder
        if index.get("requires_aesthetics_score") is True or index.get("text_encoder") == [None, None]:
            return "an SDXL refiner folder (minifusion needs the SDXL base model)"
        return None
    for prefix, name in PIPELINES:
        if cls.startswith(prefix):
            return f"a {name} folder ({show(cls)})"
    return f"a {show(cls)} folder"


# Control networks other than the original ControlNet, by the keys their releases carry (ComfyUI tells them apart
# by the same markers) and the classes of their diffusers folders.
CONTROLNETS = [
    Family("a Control-LoRA (Stability AI's low-rank ControlNet, which patches a copy of the UNet)",
           r"^lora_controlnet$|\.(up|down)$"),
    Family("a ControlNet-LLLite (kohya-ss's lightweight control modules inside the UNet's attention)", r"^lllite_"),
    Family("a T2I-Adapter (a small separate encoder whose features are added to the UNet's)",
           r"^(adapter\.)?body\.\d+\.|^adapter\.conv_in\.", classes=("T2IAdapter", "MultiAdapter")),
    Family("a ControlNet-Union (one network for several condition types, chosen by a task embedding)",
           r"^(control_model\.)?(task_embedding$|transformer_layes\.|spatial_ch_projs\.|control_add_embedding\.)",
           classes=("ControlNetUnionModel",)),
    Family("a ControlNet-XS (a small control network exchanging features with the UNet at every block)",
           r"^(ctrl_conv_in|control_to_base_for_conv_in)\.|\.(base_to_ctrl|ctrl_to_base)\.",
           classes=("ControlNetXSAdapter",)),
]

# LoRAs for other model families, from the names of the modules they adapt (a LoRA module's name without its
# tensor suffix) or the cross-attention width those have. SD 1.x / 2.x have attention at the first UNet level
# (SDXL's has none) and one text encoder (kohya's lora_te_): told by names no SDXL layer has.
LORA_TARGETS = [
    Family("Flux", r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d"),
    Family("Stable Diffusion 3", r"(^|[._])joint_blocks[._]\d|transformer_blocks[._]\d+[._]attn[._]add_q_proj"),
]
LORA_CONTEXT = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 1280: "the SDXL refiner"}
LORA_UNKNOWN_NAMES = [
    Family("Stable Diffusion 1.x / 2.x",
           r"^lora_te_|(^|[._])down_blocks[._]0[._]attentions[._]|(^|[._])input_blocks[._]1[._]1[._]"),
]
