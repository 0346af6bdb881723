"""The web UI under load: N clients for M minutes against the tiny random model, each sending a mix of runs,
runs from an uploaded picture and requests the server must refuse, while a probe times the page.

    .venv/bin/python -m bench.ui_load --clients 8 --minutes 2

Checks, and prints with the figures:
- every request is answered: a run's PNGs, or a refusal with its reason (a bad size, one over --max-size, the
  queue full); none times out or fails without one;
- the queue keeps its order: of two requests queued more than a second apart, the earlier runs first (the output
  numbers, which the server gives in the order runs start);
- the resident set of the server is back within --margin MiB of where it was before the load (after a warm-up
  run of each kind, so that what stays loaded for good is not counted), its peak during the load beside it;
- the page stays responsive: the worst and 95th-percentile latency of GET / while loaded.

Writes bench/results/<stamp>-ui-load.json (git-ignored). Not a test: it takes minutes and its figures depend
on the machine.
"""
import argparse
import io
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
REFUSED = ("is not a multiple of 8", "over this server's limit", "Queue is full", "queue is full")


@dataclass
class Request:
    client: int
    kind: str  # run, picture, bad size, too large
    sent: float  # s since the load began
    seconds: float = 0.0
    outcome: str = ""  # answered, refused, unanswered
    reason: str = ""
    number: int | None = None  # the output number the server gave its run


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.ui_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--margin", type=float, default=128, help="MiB the resident set may stay above its start")
    ap.add_argument("--max-size", type=int, default=1024, help="the server's --max-size (px)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    return ap.parse_args(argv)


def start_server(root: Path, max_size: int) -> tuple[subprocess.Popen, str]:
    """The UI on a tiny random checkpoint written under root, on a free port of 127.0.0.1, one torch thread."""
    weights = root / "weights"
    subprocess.run([sys.executable, "-m", "minifusion.tiny", str(weights)], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "minifusion.ui", "--weights", str(weights / "tiny_sdxl.safetensors"),
                             "--port", str(port), "--device", "cpu", "--dtype", "float32", "--max-size", str(max_size),
                             "--outputs", str(root / "outputs")], cwd=root, env=env,
                            stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{(root / 'server.log').read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not answer within 2 minutes")


def resident(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak since clear_refs) of a process, bytes."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v.split()[0]) << 10 for k, _, v in (line.partition(":") for line in lines)
            if k in ("VmRSS", "VmHWM")}


def picture_bytes(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((rng.choice([200, 300, 400]), 200), 64).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def client_loop(index: int, url: str, until: float, began: float, log: list, root: Path) -> None:
    from gradio_client import Client, handle_file

    rng = random.Random(index)
    client = Client(url, verbose=False, download_files=str(root / f"client{index}"))
    picture = root / f"picture{index}.png"
    picture.write_bytes(picture_bytes(rng))
    while time.monotonic() < until:
        kind = rng.choices(["run", "picture", "bad size", "too large"], [6, 2, 1, 1])[0]
        kwargs = {"run": {"width": rng.choice([256, 512]), "height": 256},
                  "picture": {"width": 512, "image": handle_file(str(picture))},
                  "bad size": {"width": 500, "height": 256},
                  "too large": {"width": 65536, "height": 65536}}[kind]
        request = Request(index, kind, time.monotonic() - began)
        try:
            _, summary = client.submit("a lighthouse", steps=1, api_name="/generate", **kwargs).result(timeout=600)
            request.outcome = "answered"
            request.number = int(summary["scales"][-1]["latents"][:5])
        except Exception as e:  # a refusal arrives as an exception carrying its reason
            reason = str(e).splitlines()[0] if str(e) else ""
            request.outcome = "refused" if any(r in reason for r in REFUSED) else "unanswered"
            request.reason = reason or type(e).__name__
        request.seconds = time.monotonic() - began - request.sent
        log.append(request)


def page_probe(url: str, until: float, latencies: list) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        urllib.request.urlopen(url, timeout=60).read()
        latencies.append(time.monotonic() - started)
        time.sleep(0.5)


def inversions(requests: list[Request], apart: float = 1.0) -> int:
    """Pairs of answered runs where the one sent more than `apart` seconds earlier started later."""
    runs = sorted((r for r in requests if r.number is not None), key=lambda r: r.sent)
    return sum(1 for i, a in enumerate(runs) for b in runs[i + 1:] if b.sent - a.sent > apart and a.number > b.number)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="minifusion-ui-load-"))
    proc, url = start_server(root, args.max_size)
    try:
        from gradio_client import Client, handle_file

        # each kind of run once first, so that what stays loaded for good (the VAE encoder's first use, say) is
        # not counted as growth
        warm = Client(url, verbose=False)
        picture = root / "warm-up.png"
        picture.write_bytes(picture_bytes(random.Random(0)))
        warm.predict("warm-up", width=512, height=256, steps=1, api_name="/generate")
        warm.predict("warm-up", width=512, steps=1, image=handle_file(str(picture)), api_name="/generate")
        time.sleep(2)
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        before = resident(proc.pid)["VmRSS"]
        began = time.monotonic()
        until = began + 60 * args.minutes
        requests, latencies = [], []
        threads = [threading.Thread(target=client_loop, args=(i, url, until, began, requests, root))
                   for i in range(args.clients)] + [threading.Thread(target=page_probe, args=(url, until, latencies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = resident(proc.pid)["VmHWM"]
        time.sleep(5)  # the last run's buffers let go
        after = resident(proc.pid)["VmRSS"]
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    counts = {o: sum(r.outcome == o for r in requests) for o in ("answered", "refused", "unanswered")}
    by_kind = {k: {o: sum(r.kind == k and r.outcome == o for r in requests) for o in counts}
               for k in ("run", "picture", "bad size", "too large")}
    runs = [r.seconds for r in requests if r.outcome == "answered"]
    mib = 1 << 20
    result = {
        "machine": {"cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
        "clients": args.clients, "minutes": args.minutes, "requests": len(requests), **counts, "by_kind": by_kind,
        "queue_order_inversions": inversions(requests),
        "run_seconds": {"median": statistics.median(runs), "max": max(runs)} if runs else None,
        "resident_mib": {"before": before / mib, "peak": peak / mib, "after": after / mib,
                         "margin": args.margin},
        "page_latency_s": {"worst": max(latencies), "p95": statistics.quantiles(latencies, n=20)[-1],
                           "median": statistics.median(latencies), "probes": len(latencies)},
        "unanswered": [asdict(r) for r in requests if r.outcome == "unanswered"],
        "refusal_reasons": sorted({re.sub(r"\d+", "N", r.reason) for r in requests if r.outcome == "refused"}),
    }
    checks = {"every request answered or refused with a reason": counts["unanswered"] == 0,
              "the queue's order kept": result["queue_order_inversions"] == 0,
              f"the resident set back within {args.margin:g} MiB": after - before <= args.margin * mib}
    result["checks"] = checks
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{args.clients} clients x {args.minutes:g} min: {len(requests)} requests, {counts['answered']} answered, "
          f"{counts['refused']} refused with a reason, {counts['unanswered']} unanswered")
    for kind, outcomes in by_kind.items():
        print(f"  {kind:10} " + ", ".join(f"{n} {o}" for o, n in outcomes.items()))
    if runs:
        print(f"  a run from sent to answered: median {statistics.median(runs):.1f} s, worst {max(runs):.1f} s")
    print(f"  refusals: {'; '.join(result['refusal_reasons'])}")
    print(f"queue order: {result['queue_order_inversions']} inversions among runs sent over a second apart")
    print(f"server resident set: {before / mib:.0f} MiB before, peak {peak / mib:.0f} MiB, {after / mib:.0f} MiB "
          f"after ({(after - before) / mib:+.0f} MiB; margin {args.margin:g} MiB)")
    lat = result["page_latency_s"]
    print(f"GET / while loaded: worst {lat['worst'] * 1000:.0f} ms, p95 {lat['p95'] * 1000:.0f} ms, median "
          f"{lat['median'] * 1000:.0f} ms over {lat['probes']} probes")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}-ui-load.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
