"""minifusion "a prompt" --out img.png [--height 4096 --width 4096 ...]      (or: python -m minifusion ...)

Writes every scale as soon as it is ready: img.x1.png (the base size), img.x2.png, ..., and the last scale as
img.png, each with its latents beside it (img.x2.latent.safetensors). Each PNG carries the prompt and every
setting (Automatic1111's `parameters` text and minifusion's JSON); `--settings-from img.png` runs them again, and
`--resume img.x2.latent.safetensors` continues that run from scale 2, to the same or a larger size. Without
--out, images are numbered in outputs/ (00001-<seed>.png, ...). Under torchrun the ranks share each image's
work (view parallel) or, with --count / --prompts, the images (image parallel).

The flags are minifusion.settings' rows. Nothing here imports torch: --help and --version answer at once, and
Ctrl-C while the rest loads is one line (minifusion.command runs the request).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .settings import RUN, GiB, ROWS, VERSION, Setting, cli_word, parse_size


def _memory_size(text: str) -> int:
    try:
        return parse_size(text, unit=GiB)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _typed(parse):
    """A row's parse as an argparse type: its ValueError is argparse's one-line usage error."""
    def typed(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    typed.__name__ = parse.__name__
    return typed


def _help(s: Setting) -> str:
    shown = s.default is not None and s.kind is not bool and not s.many and not s.resolved
    return s.described(cli_word) + (f" (default {s.default:g})" if shown and isinstance(s.default, float) else
                     f" (default {s.default})" if shown else "")


def parser() -> argparse.ArgumentParser:
    """The command line: a flag per row of minifusion.settings (its help and default from the row)."""
    ap = argparse.ArgumentParser(prog="minifusion", description="DemoFusion high-resolution text-to-image on "
                                 "SDXL: one image per scale, from the base size up.")
    ap.add_argument("--version", action="version", version=f"minifusion {VERSION}")
    for s in ROWS:
        if s.name == "prompt":
            ap.add_argument("prompt", nargs="?", help=s.described(cli_word))
            continue
        # a recorded setting not given is None, so that --settings-from and --resume may set it
        kw = {"dest": s.name, "help": _help(s), "default": s.default if s.part == RUN else None}
        if s.kind is bool:
            ap.add_argument(s.option, action="store_const", const=not s.default, **kw)
            continue
        kw["type"] = (_memory_size if s.name == "max_memory" else _typed(s.parse) if s.parse
                      else {int: int, float: float}.get(s.kind, str))
        if s.choices:
            kw["choices"] = s.choices
        if s.metavar:
            kw["metavar"] = s.metavar
        older = ("--" + s.older.replace("_", "-"),) if s.older else ()
        ap.add_argument(s.option, *older, action="append" if s.many else "store", **kw)
    return ap


def parse_args(argv):
    return parser().parse_args(argv)


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def main(argv=None) -> int:
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # started by torchrun
    rank = os.environ.get("RANK", "0") if launched else "0"
    prefix = f"rank {rank}: " if rank != "0" else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("minifusion")
    logger.addHandler(handler)
    try:
        args = parse_args(argv)
        from .command import FAILURES, USER_ERRORS, run  # torch and the models: seconds, so after --help
        try:
            return run(args)
        except USER_ERRORS as e:  # what the user can fix
            print(f"error: {prefix}{e}", file=sys.stderr)
            return 2
        except FAILURES as e:
            print(f"error: {prefix}{e}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("\ninterrupted before anything was written", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


if __name__ == "__main__":
    sys.exit(main())
