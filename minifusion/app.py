"""python -m minifusion.ui [--weights W] [--host 127.0.0.1] [--port 7860] [--outputs outputs/] [--max-size PX]
[--auth USER:PASSWORD | --auth-file FILE] [--allowed-host NAME]

The web UI's command line: load the model once, set this server's limits (minifusion.studio.Limits), keep uploads
in a folder of its own outside the served one, and listen, checking each request's Host (minifusion.access) and,
with --auth, a login. The page is minifusion.ui; what it drives, minifusion.studio.
"""
import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .access import HostCheck, allowed_hosts, exposure_notice, logins, reachable_from_network
from .checkpoint import CheckpointError, inspect_checkpoint
from .folders import FOLDERS, WHAT, Folders
from .pipeline import DEFAULT_WEIGHTS, DTYPES, default_dtype, load, resolve_device
from .settings import SettingError, cli_word
from .studio import FIXED_MAX_SIZE, Limits, Studio
from .tokenizer import Tokenizer
from .ui import CSS, build_app
from .uploads import Uploads

log = logging.getLogger("minifusion")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m minifusion.ui", description="minifusion's web UI (Gradio): "
                                 "the model loads once; requests queue, one generation on the device at a time.")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                    help="SDXL .safetensors file or diffusers folder (default: weights/)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0: the network)")
    ap.add_argument("--port", type=int, default=7860, help="default 7860")
    ap.add_argument("--outputs", type=Path, default=Path("outputs"),
                    help="folder for every file the UI writes (default: outputs/)")
    for kind, flags in (("lora", ("--lora-dir", "--loras")), ("vae", ("--vae-dir",)),
                        ("embedding", ("--embeddings-dir",)), ("controlnet", ("--controlnet-dir",))):
        ap.add_argument(*flags, dest=f"{kind}_dir", type=Path, metavar="DIR",
                        help=f"the {WHAT[kind]} files to offer (default: {FOLDERS[kind]}/ inside the weights folder, "
                        "or next to the checkpoint file)" + (", each loaded at start" if kind == "embedding" else ""))
    ap.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                    help="a name this server may be reached by besides the address it listens on (a tunnel's or a "
                    "reverse proxy's public name); requests naming another host are refused. Repeatable")
    ap.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                    help="ask for a login (repeatable; other users of this machine can read it in the process "
                    "list: --auth-file keeps it out)")
    ap.add_argument("--auth-file", type=Path, metavar="FILE", help="logins, one USER:PASSWORD a line")
    ap.add_argument("--max-size", type=int, metavar="PX",
                    help="the longest side a run may have (default: on CUDA the largest square the memory model "
                    f"predicts fits with one view per UNet call; elsewhere {FIXED_MAX_SIZE}); uploaded pictures may "
                    "have as many pixels as such a square")
    ap.add_argument("--max-queue", type=int, default=32, metavar="N",
                    help="requests waiting at most; more are refused until the queue shortens (default 32)")
    ap.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    ap.add_argument("--dtype", choices=list(DTYPES),
                    help="default: float16 on GPUs; on CPUs bfloat16 where the CPU has it in hardware, else float32")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    outputs = args.outputs.resolve()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    started = time.perf_counter()
    try:
        users = logins(args.auth, args.auth_file)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
        dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
        folders = Folders.beside(args.weights, **{k: getattr(args, f"{k}_dir") for k in FOLDERS})
        embeddings, skipped = folders.embeddings(inspect_checkpoint(args.weights), Tokenizer().encode)
        for line in skipped:
            log.warning("embedding skipped: %s", line)
        pipe = load(args.weights, device=device, dtype=dtype, embeddings=embeddings)
        if args.max_size is not None and args.max_size < pipe.base_size:
            raise ValueError(f"--max-size {args.max_size} is below the model's base size, {pipe.base_size} px: "
                             "no run would be allowed")
        pipe.model_info()  # hashes the weights for the images' metadata now, not before the first image
        outputs.mkdir(parents=True, exist_ok=True)
    except SettingError as e:
        print(f"error: {e.worded(cli_word)}", file=sys.stderr)
        return 2
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --outputs {args.outputs}: cannot create it ({e.strerror or e})", file=sys.stderr)
        return 2
    # Gradio keeps uploads (and what it makes to show, the Canny preview) under GRADIO_TEMP_DIR, read when it is
    # imported: a folder of this server's own, outside the output folder it serves as it is, so that an upload
    # is never served as the page it claims to be; removed when the server stops
    uploads = Path(tempfile.mkdtemp(prefix="minifusion-uploads-"))
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        limits = Limits.of(pipe.configs, device, dtype, args.max_size)
        studio = Studio(pipe, args.weights, outputs, Uploads(uploads, limits.max_pixels), limits, folders, skipped)
        print(f"loaded {args.weights} on {device} ({str(dtype).replace('torch.', '')}) in "
              f"{time.perf_counter() - started:.1f} s" + ("; the tiny random model: its images are noise"
                                                          if studio.is_tiny else ""), file=sys.stderr)
        notice = exposure_notice(args.host, args.port, login=bool(users))
        return serve(build_app(studio, notice), args, outputs, uploads, limits, users)
    finally:
        shutil.rmtree(uploads, ignore_errors=True)


def serve(demo, args, outputs: Path, uploads: Path, limits: Limits, users: list[tuple[str, str]]) -> int:
    """Listen until Ctrl-C or SIGTERM."""
    from fastapi.middleware import Middleware

    demo.queue(default_concurrency_limit=1, max_size=args.max_queue)
    host_check = Middleware(HostCheck, allowed=allowed_hosts(args.host, args.allowed_host))
    try:
        # an upload may be as large as the largest picture taken uncompressed (RGBA), and a little more
        demo.launch(server_name=args.host, server_port=args.port, quiet=True, prevent_thread_lock=True, css=CSS,
                    footer_links=["api"], max_file_size=4 * limits.max_pixels + (1 << 20),
                    app_kwargs={"middleware": [host_check]}, auth=users or None,
                    auth_message="minifusion: log in with a name and password the server was started with")
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port} ({e}); choose another --port", file=sys.stderr)
        return 2
    print(f"minifusion UI on http://{args.host}:{args.port}/ (outputs in {outputs}, uploads in {uploads} while it "
          f"runs); runs up to {limits.max_size} px a side, at most {args.max_queue} waiting", file=sys.stderr)
    if reachable_from_network(args.host) and not users:
        print(f"--host {args.host}: the UI is reachable from the network without a login; anyone who can reach this "
              f"machine on port {args.port} can generate images and download what is in {outputs} (--auth-file "
              "asks for one)", file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a service manager's stop ends it as Ctrl-C does
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0
