"""LoRA and LyCORIS adapters, merged into the weights while the checkpoint loads.

    minifusion.load(path, loras=[("style.safetensors", 0.8), ("detail.safetensors", 1.0)])

Each adapter module adds a low-rank (or Kronecker / Hadamard) update to one Linear or Conv2d weight of the UNet
or a text encoder. It is merged in float32 into the checkpoint's tensor before that is cast to the run's dtype
(`checkpoint.load_components(..., patch=)`), so generation costs nothing extra and a half-precision model is
rounded once. Adapter tensors are read from the file when their module is merged, never held all at once.

Formats, recognised from tensor names (a module's name, a dot, one of PARTS):
  kohya-ss / A1111 `lora_unet_*`, `lora_te1_*`, `lora_te2_*` with `lora_down.weight`, `lora_up.weight`, optional
      `alpha`, `lora_mid.weight` (LoCon's Tucker core for k x k convs); module names are our module paths (the
      original SDXL names) or diffusers' paths with "." written "_";
  diffusers / PEFT `unet.<diffusers path>`, `text_encoder(_2).<transformers path>` with `lora_A.weight` /
      `lora_B.weight`, alpha from the `lora_adapter_metadata` header (`<component>.lora_alpha`, `.alpha_pattern`,
      `.use_rslora`) or equal to the rank;
  LyCORIS LoHa (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, optional Tucker cores `hada_t1`, `hada_t2`)
      and LoKr (`lokr_w1` or `lokr_w1_a`/`lokr_w1_b`, `lokr_w2` or `lokr_w2_a`/`lokr_w2_b`, optional `lokr_t2`);
  DoRA's `dora_scale` beside any of them.
Names are looked up in a table built from our modules (`module_names`), never parsed by splitting on "_".

The update of one module with weight m (the A1111 / kohya multiplier, diffusers' `scale` / `lora_scale`):
  LoRA  ΔW = m · s · up @ down, s = alpha / rank (a missing or zero alpha means s = 1; rsLoRA: alpha / √rank);
        for a k x k conv, down is (rank, in, k, k) and up (out, rank, 1, 1), composed in rank space; with a
        Tucker core, ΔW = Σ up[o, a] mid[a, b, kh, kw] down[b, i]
  LoHa  ΔW = m · s · (w1a @ w1b) ⊙ (w2a @ w2b), s = alpha / rank
  LoKr  ΔW = m · s · kron(w1, w2), each factor whole or a product of two; s = alpha / rank only where a factor
        is decomposed, else 1
  DoRA  V = W + s · ΔW₁ (ΔW₁ the update at m = 1), W' = W + m · (dora_scale ⊙ V / ‖V‖ − W), the norm taken
        per input channel (dora_scale (1, in, ...), LyCORIS' default) or per output channel ((out, 1, ...)),
        as ComfyUI and LyCORIS merge it (LyCORIS adds float32 epsilon to the norm; so does this)
Several adapters apply in the order given, each to the weight the previous ones left.

Strict like the checkpoint loader: every tensor name must belong to a module of a known format, every module
must name one of our layers (by one name only), every shape must fit that layer; everything wrong is
reported in one CheckpointError line naming the file. LoRAs for other families (SD 1.x / 2.x, the SDXL
refiner, SD3, Flux) are named as such. Pickled adapters (.pt, .ckpt, .bin, .pth) are never opened.

`Lora hashes` in A1111's PNG text: "name: hash, ..." (`infotext`), the hash being the first 12 hex digits of
kohya's "addnet" hash (SHA-256 of the file after its header, so editing the metadata keeps it) or, as A1111
prefers it, the `sshs_model_hash` kohya writes into the header.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .checkpoint import Configs, meta_models
from .families import CHECKPOINTS, LORA_CONTEXT, LORA_TARGETS, LORA_UNKNOWN_NAMES, PICKLE_SUFFIXES, identify
from .models import clip, unet
from .safetensors_check import DTYPES, CheckpointError, SafetensorsFile, show

SHOWN = 5  # offending names an error lists per kind
HASH_CHARS = 12  # A1111's short hash in "Lora hashes"

# tensor name suffix -> role inside one adapted module
PARTS = {
    "lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
    "lora_mid.weight": "mid",
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1", "hada_t2": "t2",
    "lokr_w1": "k1", "lokr_w1_a": "k1a", "lokr_w1_b": "k1b", "lokr_w2": "k2", "lokr_w2_a": "k2a", "lokr_w2_b": "k2b",
    "lokr_t2": "kt2",
    "alpha": "alpha", "dora_scale": "dora_scale",
    "lora_magnitude_vector": "magnitude",
}
KINDS = {"lora": {"down", "up", "mid"}, "loha": {"w1a", "w1b", "w2a", "w2b", "t1", "t2"},
         "lokr": {"k1", "k1a", "k1b", "k2", "k2a", "k2b", "kt2"}}
LORA_COMPONENTS = ("unet", "text_encoder_1", "text_encoder_2")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder_1": "lora_te1_", "text_encoder_2": "lora_te2_"}
PEFT_PREFIX = {"unet": "unet", "text_encoder_1": "text_encoder", "text_encoder_2": "text_encoder_2"}
ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' header key: its LoraConfig per component, flattened

@dataclass(frozen=True)
class Target:
    component: str  # "unet", "text_encoder_1" or "text_encoder_2"
    module: str  # our module's name, e.g. "input_blocks.4.1.transformer_blocks.0.attn1.to_q"


@dataclass(frozen=True)
class Module:
    """One adapted layer of one file: which tensors (role -> name in the file) update which of our weights."""
    name: str
    target: Target
    kind: str  # "lora", "loha" or "lokr"
    tensors: dict[str, str]  # without alpha, which is in the scale
    scale: float  # alpha / rank, or 1


@dataclass(frozen=True)
class Applied:
    """What a Pipeline has merged: the file's name (its stem), the weight, A1111's short hash."""
    name: str
    weight: float
    hash: str


# ---------------------------------------------------------------------------------------------------------
# Names: every name a LoRA file may give one of our layers.

def module_names(cfgs: Configs, models: dict[str, torch.nn.Module] | None = None) -> dict[str, Target]:
    """{name in a LoRA file: our layer} for every Linear and Conv2d of the UNet and both text encoders: kohya's
    names over our (the original SDXL) paths and over diffusers' paths, and diffusers / PEFT paths, the text
    encoders' with and without transformers' `text_model.` level. `models`: ours on the meta device."""
    models = models or meta_models(cfgs)
    unet_paths = _module_table(unet.diffusers_keys(cfgs.unet))
    names: dict[str, Target] = {}

    def add(name: str, target: Target) -> None:
        if names.setdefault(name, target) != target:
            raise ValueError(f"LoRA name {name} would mean both {names[name]} and {target}")

    for component in LORA_COMPONENTS:
        if component == "unet":
            table = unet_paths
        else:
            cfg = getattr(cfgs, component)
            table = _module_table(clip.hf_keys(cfg))
            bare = _module_table(clip.hf_keys(cfg, prefix=""))
        for ours, layer in models[component].named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            target = Target(component, ours)
            kohya, peft = KOHYA_PREFIX[component], PEFT_PREFIX[component]
            add(kohya + table[ours].replace(".", "_"), target)
            add(f"{peft}.{table[ours]}", target)
            if component == "unet":
                add(kohya + ours.replace(".", "_"), target)
            else:
                add(f"{peft}.{bare[ours]}", target)
    return names


def _module_table(keys: dict[str, tuple[str, str]]) -> dict[str, str]:
    """{our module: its name in the other layout} from a parameter key table."""
    return {ours.removesuffix(".weight"): theirs.removesuffix(".weight")
            for ours, (theirs, _) in keys.items() if ours.endswith(".weight")}


# ---------------------------------------------------------------------------------------------------------
# The updates, as pure functions of the module's tensors (float32 ones when merging, meta ones when checking
# shapes). They return ΔW before the scale: (out, in) or (out, in, k, k), or (out, in·k·k) for a conv whose
# factors are stored flat.

def lora_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    up, down = t["up"].flatten(1), t["down"].flatten(1)
    if "mid" in t:
        return torch.einsum("a b h w, o a, b i -> o i h w", t["mid"], up, down)
    return up @ down


def _tucker(core: torch.Tensor, out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    # LyCORIS' rebuild_tucker: core (rank, rank, k, k), out (rank, out), inp (rank, in) -> (out, in, k, k)
    return torch.einsum("a b h w, a o, b i -> o i h w", core, out, inp)


def loha_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    if "t1" in t:
        return _tucker(t["t1"], t["w1a"], t["w1b"]) * _tucker(t["t2"], t["w2a"], t["w2b"])
    return (t["w1a"] @ t["w1b"].flatten(1)) * (t["w2a"] @ t["w2b"].flatten(1))


def lokr_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    w1 = t["k1"] if "k1" in t else t["k1a"] @ t["k1b"]
    if "k2" in t:
        w2 = t["k2"]
    elif "kt2" in t:
        w2 = _tucker(t["kt2"], t["k2a"], t["k2b"])
    else:
        w2 = (t["k2a"] @ t["k2b"].flatten(1)).reshape(t["k2a"].shape[0], *t["k2b"].shape[1:])
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    # torch.kron views its inputs, which a permuted Tucker product (and any meta tensor of one) refuses
    return torch.kron(w1.contiguous(), w2.contiguous())


DELTAS = {"lora": lora_delta, "loha": loha_delta, "lokr": lokr_delta}


def rank(kind: str, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The rank alpha is divided by; None for a LoKr with both factors whole (its scale is 1)."""
    if kind == "lora":
        return shapes["down"][0]
    if kind == "loha":
        return shapes["w1b"][0]
    for role in ("k2b", "k1b"):  # A1111 and ComfyUI take the second factor's rank where both are decomposed
        if role in shapes:
            return shapes[role][0]
    return None


def fit(delta: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """ΔW in the layer's shape: as computed, or a flat (out, in·k·k) one for a k x k conv; None if it fits not."""
    if delta.shape == shape:
        return delta
    if delta.dim() == 2 and len(shape) == 4 and delta.shape == (shape[0], math.prod(shape[1:])):
        return delta.reshape(shape)
    return None


def dora_axis(scale_shape: tuple[int, ...], shape: torch.Size) -> int | None:
    """The axis dora_scale keeps: 1 for (1, in, 1, ...), LyCORIS' default, 0 for (out, 1, ...); None if neither."""
    ones = (1,) * (len(shape) - 2)
    if tuple(scale_shape) == (1, shape[1], *ones):
        return 1
    if tuple(scale_shape) == (shape[0], 1, *ones):
        return 0
    return None


def merge(weight: torch.Tensor, delta: torch.Tensor, m: float,
          dora_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W + m·ΔW, or DoRA's W + m·(dora_scale ⊙ V / ‖V‖ − W) with V = W + ΔW; delta already scaled by alpha/rank."""
    if dora_scale is None:
        return torch.add(weight, delta, alpha=m)  # one new tensor: a large layer's temporaries add to peak memory
    v = weight + delta
    axis = dora_axis(tuple(dora_scale.shape), weight.shape)
    norm = torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != axis], keepdim=True)
    return weight + m * (dora_scale * v / (norm + torch.finfo(torch.float32).eps) - weight)


# ---------------------------------------------------------------------------------------------------------
# Opening and checking one file.

def parse_spec(spec: str) -> tuple[Path, float]:
    """"PATH[:WEIGHT]" (the CLI's --lora) -> (path, weight); the weight defaults to 1. A colon that is not
    followed by a number belongs to the path."""
    path, _, tail = spec.rpartition(":")
    try:
        weight = float(tail)
    except ValueError:
        if path and Path(path).is_file() and not Path(spec).exists():
            raise ValueError(f"--lora {spec!r}: the weight {tail!r} is not a number; write PATH:WEIGHT, e.g. "
                             f"{path}:0.8") from None
        return Path(spec), 1.0
    if not path or not math.isfinite(weight):
        raise ValueError(f"--lora {spec!r}: expected PATH or PATH:WEIGHT with a finite weight")
    return Path(path), weight


@dataclass(frozen=True)
class Layers:
    """What adapters are checked against: the names of our layers, their weights' shapes, the UNet's context
    width (a cross-attention LoRA of another width is for another model family)."""
    names: dict[str, Target]
    shapes: dict[Target, torch.Size]
    context_dim: int

    @classmethod
    @functools.lru_cache(maxsize=4)  # building the meta models is most of the cost of opening a LoRA
    def of(cls, cfgs: Configs) -> "Layers":
        models = meta_models(cfgs)
        shapes = {Target(c, name): layer.weight.shape for c in LORA_COMPONENTS for name, layer in
                  models[c].named_modules() if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))}
        return cls(module_names(cfgs, models), shapes, cfgs.unet.context_dim)


# the factor roles each kind may have: one of these sets exactly, plus optional alpha and dora_scale
COMPLETE = {
    "lora": ({"down", "up"}, {"down", "up", "mid"}),
    "loha": ({"w1a", "w1b", "w2a", "w2b"}, {"w1a", "w1b", "w2a", "w2b", "t1", "t2"}),
}
LOKR_FIRST = ({"k1"}, {"k1a", "k1b"})
LOKR_SECOND = ({"k2"}, {"k2a", "k2b"}, {"k2a", "k2b", "kt2"})
PROBLEMS = ("not an adapter tensor", "unsupported", "incomplete", "matching no SDXL layer", "patching a layer twice",
            "misshapen", "not floating point")
FLOATS = {name for name, dt in DTYPES.items() if dt.is_floating_point}


class Adapter:
    """One LoRA file, checked against the model on opening; its tensors are read when merged."""

    def __init__(self, path: Path, weight: float, layers: Layers):
        self.path, self.weight = path, weight
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: a pickle file ({path.suffix}) is not loaded as a LoRA, since unpickling "
                                  "can run code; use the .safetensors release of this LoRA")
        self.file = SafetensorsFile(path)
        try:
            self.modules = self._check(layers)
            self.hash = self._short_hash()
        except BaseException:
            self.file.close()
            raise

    def close(self) -> None:
        self.file.close()

    def applied(self) -> Applied:
        return Applied(self.path.stem, self.weight, self.hash)

    def read(self, module: Module, role: str) -> torch.Tensor:
        return self.file.read(module.tensors[role]).float()

    def delta(self, module: Module, shape: torch.Size) -> torch.Tensor:
        """s · ΔW in float32, in the layer's shape (checked on opening to fit)."""
        factors = {r: self.read(module, r) for r in module.tensors if r != "dora_scale"}
        return fit(DELTAS[module.kind](factors), shape).mul_(module.scale)

    def _check(self, layers: Layers) -> list[Module]:
        problems: dict[str, list[str]] = {k: [] for k in PROBLEMS}
        groups: dict[str, dict[str, str]] = {}
        for key in self.file.entries:
            part = next((p for p in PARTS if key.endswith("." + p)), None)
            if part is None:
                problems["not an adapter tensor"].append(key)
                continue
            roles = groups.setdefault(key[:-len(part) - 1], {})
            if PARTS[part] in roles:
                problems["incomplete"].append(f"{key} (a second {PARTS[part]} tensor beside {roles[PARTS[part]]})")
            roles[PARTS[part]] = key
        if not groups:
            family = identify(self.file.entries, CHECKPOINTS)  # its note is for the main checkpoint: the name only
            raise CheckpointError(f"{self.path}: not a LoRA / LyCORIS file (no tensor is named like "
                                  "*.lora_down.weight, *.lora_A.weight, *.hada_w1_a or *.lokr_w1)"
                                  + (f"; this is {family.name}" if family else ""))

        metadata = self._peft_metadata()
        modules, seen = [], {}
        for name, roles in groups.items():
            kind = _kind(name, roles, problems)
            target = layers.names.get(name)
            if kind is None:
                continue
            if target is None:
                problems["matching no SDXL layer"].append(name)
            elif target in seen:
                problems["patching a layer twice"].append(f"{seen[target]} and {name}")
            else:
                seen[target] = name
                module = self._module(name, target, kind, roles, layers.shapes[target], metadata, problems)
                if module is not None:
                    modules.append(module)

        if any(problems.values()):
            family = self._family(groups, layers)
            if family:
                raise CheckpointError(f"{self.path}: this is a LoRA for {family}; minifusion needs a LoRA for SDXL "
                                      "base 1.0 (or a fine-tune of it)")
            if len(problems["matching no SDXL layer"]) == len(groups):
                raise CheckpointError(f"{self.path}: none of its {len(groups)} modules is a layer of this SDXL model "
                                      f"(e.g. {_listed(sorted(groups))}); it is not a LoRA for SDXL")
            report = "; ".join(f"{len(v)} {k}: {_listed(v)}" for k, v in problems.items() if v)
            raise CheckpointError(f"{self.path}: does not fit this SDXL model; {report}; a LoRA made for SDXL base "
                                  "1.0 (or a fine-tune of it) loads, a damaged one does not")
        return modules

    def _module(self, name: str, target: Target, kind: str, roles: dict[str, str], shape: torch.Size,
                metadata: dict[str, dict], problems) -> Module | None:
        entries = self.file.entries
        integer = [f"{k} {entries[k].dtype}" for r, k in roles.items()
                   if r != "alpha" and entries[k].dtype not in FLOATS]
        if integer:
            problems["not floating point"] += integer
            return None
        shapes = {r: entries[k].shape for r, k in roles.items()}
        try:
            delta = DELTAS[kind]({r: torch.empty(s, device="meta") for r, s in shapes.items()
                                  if r not in ("alpha", "dora_scale")})
        except (RuntimeError, IndexError, ValueError):
            delta = None
        r = rank(kind, shapes)
        if delta is None or fit(delta, shape) is None or r == 0 or \
                ("dora_scale" in shapes and dora_axis(shapes["dora_scale"], shape) is None):
            got = ", ".join(f"{k.removeprefix(name + '.')} {list(shapes[role])}" for role, k in roles.items()
                            if role != "alpha")
            problems["misshapen"].append(f"{name} ({got}; the layer is {list(shape)})")
            return None
        config = metadata.get(PEFT_PREFIX[target.component], {}) if _peft_named(name) else {}
        alpha = self._alpha(roles.get("alpha"), name, config, problems)
        if alpha is False:
            return None
        divisor = None if r is None else math.sqrt(r) if config.get("use_rslora") is True else r
        scale = alpha / divisor if alpha and divisor else 1.0
        return Module(name, target, kind, {k: v for k, v in roles.items() if k != "alpha"}, scale)

    def _alpha(self, key: str | None, name: str, config: dict, problems) -> float | None | bool:
        """The module's alpha: its own tensor, else diffusers' header, else None (the rank: scale 1); False
        when its tensor is not one finite number."""
        if key is not None:
            e = self.file.entries[key]
            value = self.file.read(key).double().item() if math.prod(e.shape) == 1 and e.dtype != "BOOL" else None
            if value is None or not math.isfinite(value):
                problems["misshapen"].append(f"{key} {list(e.shape)} {e.dtype} (alpha is one finite number)")
                return False
            return value
        # PEFT reads alpha_pattern keys as regular expressions; diffusers writes plain module names, matched
        # here as a literal suffix (a file's regular expression could take forever to match)
        path = name.split(".", 1)[-1]
        pattern = config.get("alpha_pattern")
        for k, v in pattern.items() if isinstance(pattern, dict) else ():
            if isinstance(k, str) and (path == k or path.endswith("." + k)) and _number(v):
                return float(v)
        value = config.get("lora_alpha")
        return float(value) if _number(value) else None

    def _peft_metadata(self) -> dict[str, dict]:
        """{component prefix: {LoraConfig field: value}} from diffusers' lora_adapter_metadata header."""
        raw = self.file.metadata.get(ADAPTER_METADATA)
        if raw is None:
            return {}
        try:
            flat = json.loads(raw)
        except (ValueError, RecursionError):
            flat = None
        if not isinstance(flat, dict):
            raise CheckpointError(f"{self.path}: its {ADAPTER_METADATA} header is not a JSON object; download the "
                                  "LoRA again")
        out: dict[str, dict] = {}
        for key, value in flat.items():
            prefix, _, name = key.rpartition(".")
            if prefix in PEFT_PREFIX.values():
                out.setdefault(prefix, {})[name] = value
        return out

    def _family(self, groups: dict[str, dict[str, str]], layers: Layers) -> str | None:
        """The model family the LoRA is for, when that is not SDXL (families.LORA_*), or None."""
        family = identify(groups, LORA_TARGETS)
        if family:
            return family.name
        for name, roles in groups.items():
            role = next((r for r in ("down", "w1b") if r in roles), None)
            if role and re.search(r"attn2[._]to_[kv]$", name):
                shape = self.file.entries[roles[role]].shape
                width = shape[1] if len(shape) >= 2 else None
                if width != layers.context_dim and width in LORA_CONTEXT:
                    return LORA_CONTEXT[width]
        family = identify((n for n in groups if n not in layers.names), LORA_UNKNOWN_NAMES)
        return family.name if family else None

    def _short_hash(self) -> str:
        # A1111 (extensions-builtin/Lora/network.py) takes the header's sshs_model_hash first, else kohya's addnet
        # hash (modules/hashes.py addnet_hash_safetensors): SHA-256 of the bytes after the header
        stored = self.file.metadata.get("sshs_model_hash", "")
        if re.fullmatch(r"[0-9a-fA-F]{64}", stored):
            return stored[:HASH_CHARS]
        h = hashlib.sha256()
        try:
            with open(self.path, "rb") as f:
                f.seek(self.file.data_start)
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot be read ({e.strerror or e})") from None
        return h.hexdigest()[:HASH_CHARS]


def _kind(name: str, roles: dict[str, str], problems) -> str | None:
    """"lora", "loha" or "lokr" for a complete module, else None with the reason in problems."""
    if "magnitude" in roles:
        problems["unsupported"].append(f"{name} (PEFT's DoRA, lora_magnitude_vector; DoRA as dora_scale is read)")
        return None
    have = roles.keys() - {"alpha", "dora_scale"}
    kinds = [k for k, members in KINDS.items() if members & have]
    if len(kinds) == 1:
        kind = kinds[0]
        if kind == "lokr":
            complete = (have & {"k1", "k1a", "k1b"}) in LOKR_FIRST and (have - {"k1", "k1a", "k1b"}) in LOKR_SECOND
        else:
            complete = have in COMPLETE[kind]
        if complete:
            return kind
    parts = sorted(k.removeprefix(name + ".") for k in roles.values())
    problems["incomplete"].append(f"{name} (has {', '.join(parts)})")
    return None


def _peft_named(name: str) -> bool:
    return name.split(".", 1)[0] in PEFT_PREFIX.values()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _listed(items: list[str]) -> str:
    more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(s if s.isprintable() and len(s) <= 200 else show(s, 200) for s in items[:SHOWN]) + more


# ---------------------------------------------------------------------------------------------------------
# Several files merged into one model.

class Patch:
    """The loader's patch hook for a set of adapters: patch(component, our_key, tensor) -> merged tensor."""

    def __init__(self, adapters: list[Adapter], shapes: dict[Target, torch.Size]):
        self.adapters = adapters
        self.shapes = shapes
        self.by_key: dict[tuple[str, str], list[tuple[Adapter, Module]]] = {}
        for adapter in adapters:
            for module in adapter.modules:
                key = (module.target.component, module.target.module + ".weight")
                self.by_key.setdefault(key, []).append((adapter, module))

    def __call__(self, component: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
        updates = self.by_key.get((component, key))
        if not updates:
            return tensor
        w = tensor.float()
        for adapter, module in updates:
            delta = adapter.delta(module, self.shapes[module.target])
            dora = adapter.read(module, "dora_scale") if "dora_scale" in module.tensors else None
            w = merge(w, delta, adapter.weight, dora)
        return w

    @property
    def applied(self) -> list[Applied]:
        return [a.applied() for a in self.adapters]

    def close(self) -> None:
        for a in self.adapters:
            a.close()


def open_loras(loras: Iterable[tuple[str | Path, float] | str | Path], cfgs: Configs) -> Patch:
    """Open and check every LoRA against the architecture `cfgs` (headers only; tensors are read when merged).
    Each item is a path or (path, weight), the weight 1 by default."""
    layers = Layers.of(cfgs)
    adapters: list[Adapter] = []
    try:
        for item in loras:
            path, weight = (item, 1.0) if isinstance(item, (str, Path)) else item
            if not _number(weight):
                raise ValueError(f"LoRA {path}: weight {weight!r} is not a finite number")
            path = Path(path)
            if not path.is_file():
                raise CheckpointError(f"{path}: no such LoRA file")
            adapters.append(Adapter(path, float(weight), layers))
    except BaseException:
        for a in adapters:
            a.close()
        raise
    return Patch(adapters, layers.shapes)


def infotext(applied: Iterable[Applied]) -> str:
    """A1111's `Lora hashes` value: "name: hash, name: hash" (":" and "," dropped from names, as A1111 does)."""
    return ", ".join(f"{a.name.translate(str.maketrans('', '', ':,'))}: {a.hash}" for a in applied)
