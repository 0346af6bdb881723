"""The web UI as a server, tried as a hostile client would (issue 19): the app on the tiny random model in a
subprocess on 127.0.0.1, sent raw HTTP (forged Host headers, /gradio_api/ calls with FileData dicts that name
server paths) and gradio_client requests, each attack bounded in requests and seconds.

One app serves the module; its working, temporary and home folders are empty but for its weights, and a canary
picture lies outside every folder it serves, so that a test can tell whether it was ever read or copied.
"""
import os
import re
import time
from pathlib import Path

import pytest
from gradio_client import Client
from helpers import serving, start_ui, stop, wait_for
from PIL import Image

from minifusion.tiny import TINY, random_models, write_single_file


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    work, tmp, home, private = root / "work", root / "tmp", root / "home", root / "private"
    for d in (work / "weights", tmp, home, private):
        d.mkdir(parents=True)
    weights = write_single_file(random_models(TINY, seed=0), TINY, work / "weights" / "tiny_sdxl.safetensors")
    canary = private / "canary.png"
    Image.new("RGB", (300, 200), (1, 2, 3)).save(canary)
    env = {**os.environ, "TMPDIR": str(tmp), "HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    log = root / "app.log"
    proc, url = start_ui(weights, work, log, env)
    try:
        serving(proc, url, log)
        yield {"url": url, "proc": proc, "root": root, "outputs": work / "outputs", "canary": canary, "log": log,
               "client": Client(url, verbose=False, download_files=str(root / "client"))}
    finally:
        stop(proc)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def of_seed(outputs: Path, seed: int) -> list[str]:
    return sorted(p.name for p in outputs.iterdir() if re.fullmatch(rf"\d{{5}}-{seed}\..*", p.name))


def test_a_cancelled_api_run_stops_after_its_step_and_holds_the_device_until_then(server):
    """Cancel returns once the run has stopped: nothing more is written, the server goes idle, and the next
    request runs alone. (Before: CANCELLED at once while the run went on writing scales in its thread, and
    three submit+cancel pairs ran side by side.)"""
    client, outputs = server["client"], server["outputs"]
    job = client.submit("a fox", width=768, height=384, steps=12, seed=11, api_name="/generate")
    wait_for(lambda: "x1.png" in "".join(of_seed(outputs, 11)), 60, "scale 1 of the run")
    job.cancel()
    written = of_seed(outputs, 11)
    busy = cpu_seconds(server["proc"].pid)
    time.sleep(2)
    assert cpu_seconds(server["proc"].pid) - busy < 0.5  # idle: no step is computed any more
    assert of_seed(outputs, 11) == written and not any(".x2." in name for name in written)
    files, summary = client.predict("a fox", width=256, height=256, steps=1, seed=12, api_name="/generate")
    assert [s["width"] for s in summary["scales"]] == [256] and of_seed(outputs, 11) == written
