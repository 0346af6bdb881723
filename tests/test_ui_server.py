"""The web UI as a server, tried as a hostile client would (issue 19): the app on the tiny random model in a
subprocess on 127.0.0.1, sent raw HTTP (forged Host headers, /gradio_api/ calls with FileData dicts that name
server paths) and gradio_client requests, each attack bounded in requests and seconds.

One app serves the module; its working, temporary and home folders are empty but for its weights, and a canary
picture lies outside every folder it serves, so that a test can tell whether it was ever read or copied.
"""
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from helpers import serving, start_ui, stop, wait_for, write_adapters
from PIL import Image

from minifusion.tiny import TINY, random_models, write_single_file


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    work, tmp, home, private = root / "work", root / "tmp", root / "home", root / "private"
    for d in (work / "weights", tmp, home, private):
        d.mkdir(parents=True)
    weights = write_single_file(random_models(TINY, seed=0), TINY, work / "weights" / "tiny_sdxl.safetensors")
    for sub in ("loras", "vae", "embeddings"):
        (work / "weights" / sub).mkdir()
    write_adapters(work / "weights" / "loras" / "style.safetensors", work / "weights" / "vae" / "other.safetensors",
                   work / "weights" / "embeddings" / "neggy.safetensors", work / "weights" / "controlnet",
                   private / "square.png")
    canary = private / "canary.png"
    Image.new("RGB", (300, 200), (1, 2, 3)).save(canary)
    env = {**os.environ, "TMPDIR": str(tmp), "HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    log = root / "app.log"
    proc, url = start_ui(weights, work, log, env)
    try:
        serving(proc, url, log)
        yield {"url": url, "proc": proc, "root": root, "outputs": work / "outputs", "canary": canary, "log": log,
               "square": private / "square.png", "tmp": tmp,
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


def post(url: str, data: bytes, content_type: str, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data, {"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def upload(server, name: str, data: bytes) -> str:
    """A file sent to Gradio's upload route as the browser sends it; its path on the server."""
    body = (f'--b\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n--b--\r\n"
    status, reply = post(server["url"] + "gradio_api/upload", body, "multipart/form-data; boundary=b")
    assert status == 200, reply
    return json.loads(reply)[0]


def png(size=(300, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def page_event(server, elem_id: str, trigger: str = "change") -> int:
    """The id of the page's event that `trigger` on the component #elem_id sets off (the browser calls it)."""
    with urllib.request.urlopen(server["url"] + "config", timeout=10) as reply:
        config = json.loads(reply.read())
    component = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == elem_id)
    return next(d["id"] for d in config["dependencies"] if [component, trigger] in d["targets"])


def run_event(server, fn_index: int, data: list) -> tuple[int, dict]:
    """The page's event called as its browser calls one outside the queue."""
    status, reply = post(server["url"] + "gradio_api/run/predict", json.dumps(
        {"data": data, "fn_index": fn_index, "session_hash": "attacker"}).encode(), "application/json")
    return status, json.loads(reply)


def test_no_file_outside_the_upload_folder_is_opened_or_copied_and_none_is_said_to_exist(server):
    """/generate and the page's own events (the size probe, the Canny preview), given FileData dicts naming a
    picture elsewhere on the server's disk: refused alike whether it exists or not, never copied into the output
    folder. (Before: /generate copied it byte for byte into outputs/, the Canny preview returned its edges, and
    the errors told which paths existed.)"""
    client, canary = server["client"], server["canary"]
    refusals = []
    for path in (str(canary), str(canary.with_name("missing.png")), "/etc/passwd"):
        for field, extra in (("image", {}), ("control_image", {"controlnet": "controlnet"})):
            with pytest.raises(AppError) as err:
                client.predict("a fox", width=512, steps=1, api_name="/generate", **{field: {"path": path}}, **extra)
            refusals.append(str(err.value))
    assert len({re.sub(r"^\S+: ", "", r) for r in refusals}) == 1, refusals
    assert all(": not a picture uploaded to this server; upload it" in r and "/" not in r for r in refusals)
    size_probe = page_event(server, "image")
    canny_preview = page_event(server, "control-image")
    for path in (str(canary), str(canary.with_name("missing.png"))):
        status, reply = run_event(server, size_probe, [{"path": path}])
        assert status == 200 and reply["data"][0] == {"__type__": "update"}, reply  # nothing set from it
        status, reply = run_event(server, canny_preview, [{"path": path}, True, 512, 512])
        assert status == 200 and reply["data"][0].get("value") is None, reply
        assert "not a picture uploaded to this server" in reply["data"][0]["label"]
    copies = [p for p in server["outputs"].rglob("*") if p.is_file() and p.read_bytes() == canary.read_bytes()]
    assert copies == [] and not any(p.name.startswith("canary") for p in server["outputs"].rglob("*"))


def test_an_uploaded_page_is_never_served_as_one_and_kept_pictures_are_pngs(server):
    """Uploads lie outside the output folder the app serves as it is, so Gradio serves them only as downloads
    unless they are pictures; a picture uploaded under an .html name is kept as .input.png. (Before: evil.html
    came back inline as text/html from outputs/.gradio/, and the picture was kept as NNNNN.input.html.)"""
    evil = upload(server, "evil.html", b"<script>alert(document.cookie)</script>")
    assert not Path(evil).is_relative_to(server["outputs"])
    with urllib.request.urlopen(server["url"] + "gradio_api/file=" + evil, timeout=10) as reply:
        assert reply.headers["Content-Type"] == "application/octet-stream"
        assert reply.headers["Content-Disposition"].startswith("attachment")
    disguised = upload(server, "pic.html", png())
    files, summary = server["client"].predict("a fox", width=512, steps=1, seed=21, api_name="/generate",
                                              image={"path": disguised, "meta": {"_type": "gradio.FileData"}})
    kept = [p for p in server["outputs"].iterdir() if re.fullmatch(r"\d{5}-21\.input\..*", p.name)]
    assert [p.name[6:] for p in kept] == ["21.input.png"] and Image.open(kept[0]).format == "PNG"
    assert not [p for p in server["outputs"].rglob("*") if p.suffix.lower() in (".html", ".htm", ".svg")]
