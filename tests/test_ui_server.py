"""The web UI as a server, tried as a hostile client would (issue 19): the app on the tiny random model in a
subprocess on 127.0.0.1, sent raw HTTP (forged Host headers, /gradio_api/ calls with FileData dicts that name
server paths) and gradio_client requests, each attack bounded in requests and seconds.

One app serves the module; its working, temporary and home folders are empty but for its weights, and a canary
picture lies outside every folder it serves, so that a test can tell whether it was ever read or copied.
"""
import http.client
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from helpers import jpeg_header, serving, start_ui, stop, wait_for, write_adapters
from PIL import Image
from safetensors.torch import save_file

from minifusion.tiny import TINY, random_models, write_single_file

MAX_SIZE, MAX_QUEUE = 1024, 20  # so uploads may have 1024 x 1024 pixels
# the resident-set growth the decode probes may cause: two decodes at once of a 1024 x 1024 RGBA picture at ~20
# bytes a pixel (40 MiB), OpenCV loaded for the first Canny preview (~35 MiB), each request's decoded picture
# (4 MiB) and Gradio's own; 107 MiB measured
DECODE_BOUND = 150 << 20


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
    proc, url = start_ui(weights, work, log, env, "--max-size", str(MAX_SIZE), "--max-queue", str(MAX_QUEUE),
                         "--allowed-host", "tunnel.example")
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
    fifo = canary.with_name("fifo.png")  # a read from it would wait for a writer, holding the queue for everyone
    os.mkfifo(fifo)
    refusals = []
    started = time.monotonic()
    for path in (str(canary), str(canary.with_name("missing.png")), "/etc/passwd", str(fifo),
                 f"{server['outputs']}/../../private/canary.png"):
        for field, extra in (("image", {}), ("control_image", {"controlnet": "controlnet"})):
            with pytest.raises(AppError) as err:
                client.predict("a fox", width=512, steps=1, api_name="/generate", **{field: {"path": path}}, **extra)
            refusals.append(str(err.value))
    assert len({re.sub(r"^\S+: ", "", r) for r in refusals}) == 1, refusals
    assert all(": not a picture uploaded to this server; upload it" in r and "/" not in r for r in refusals)
    assert time.monotonic() - started < 30
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
    # Gradio's own file route serves neither (it refuses a path outside what it serves)
    for path in (canary, f"{server['outputs']}/../private/canary.png", "/etc/passwd"):
        assert answer(server["url"], "GET", f"/gradio_api/file={path}")[0] == 403


def test_continue_takes_its_latents_from_the_server_not_from_the_client(server):
    """The continue event's run is the session's own last one, held by the server: latents a client sends in
    its place are not read."""
    config = json.loads(urllib.request.urlopen(server["url"] + "config", timeout=10).read())
    button = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == "continue")
    arm = next(d["id"] for d in config["dependencies"] if [button, "click"] in d["targets"])
    then = next(d for d in config["dependencies"] if d.get("trigger_after") == arm)
    forged = {"latents": str(server["canary"]), "gallery": [], "before": None}
    body = json.dumps({"data": ["token", forged, 768, 384], "fn_index": then["id"], "session_hash": "attacker"})
    status, reply = post(server["url"] + "gradio_api/queue/join", body.encode(), "application/json")
    assert status == 422 and b"nothing to continue yet: generate first" in reply  # its validation, at once


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


def test_a_run_over_the_size_limit_is_refused_before_anything_runs(server):
    """--max-size: 65536 x 65536 (64 scales of SDXL) and the size a large uploaded picture implies are refused at
    once, with the limit; the page's size probe sets the largest allowed size instead. (Before: accepted, and
    sent through the API and cancelled, it went on writing scales until the server was killed.)"""
    client, outputs = server["client"], server["outputs"]
    files = set(outputs.iterdir())
    with pytest.raises(AppError, match=r"^65536x65536 is over this server's limit of 1024 px a side; choose a "):
        client.predict("a fox", width=65536, height=65536, steps=1, api_name="/generate")
    wide = upload(server, "wide.png", png((2000, 400)))  # 0.8 million pixels: within the pixel limit
    with pytest.raises(AppError, match=r"^2048x408 is over this server's limit of 1024 px a side"):
        client.predict("a fox", steps=1, image={"path": wide, "meta": {"_type": "gradio.FileData"}},
                       api_name="/generate")
    assert set(outputs.iterdir()) == files  # refused before anything ran: no scale written
    status, reply = run_event(server, page_event(server, "image"), [{"path": wide}])
    assert status == 200 and reply["data"][:2] == [1024, 208], reply


def test_loras_budgets_and_uploads_are_bounded_and_each_refusal_is_one_line(server):
    """The API took 1,000 LoRAs (the page offers 8) and a weight of 1e308 (an overflow in the merge, two
    reloads); a budget of 1e30 GiB ran, then failed the reply with a traceback; uploads had no size limit."""
    client = server["client"]
    for kwargs, message in (({"lora": ["style.safetensors:0.5"] * 1000}, "1000 LoRAs: this server merges at most 8"),
                            ({"lora": ["style.safetensors:1e308"]}, "style.safetensors at 1e+308: a LoRA's weight "
                             "must be from -10 to 10"),
                            ({"max_memory": "1e30GiB"}, "Memory budget '1e30GiB' is invalid; it must be below an "
                             "exbibyte"),
                            ({"max_memory": "100000GiB"}, "a budget of 1e+05 GiB is more than this server's device"),
                            ({"lora": "style.safetensors"}, 'lora: a list of "NAME:WEIGHT"')):
        with pytest.raises(AppError) as err:
            client.predict("a fox", width=512, steps=1, api_name="/generate", **kwargs)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    status, reply = post(server["url"] + "gradio_api/upload", b"--b\r\nContent-Disposition: form-data; "
                         b'name="files"; filename="big.png"\r\n\r\n' + bytes(6 << 20) + b"\r\n--b--\r\n",
                         "multipart/form-data; boundary=b")
    assert status == 413, reply


def resident(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak since the last reset) of a process, in bytes."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v.split()[0]) << 10 for k, _, v in (line.partition(":") for line in lines)
            if k in ("VmRSS", "VmHWM")}


def test_the_decode_probes_peak_resident_memory_stays_bounded(server):
    """Pictures sent where the server decodes outside the generation queue, many at once: bombs (a tiny JPEG
    whose header claims 9400 x 9400, a 16-bit PNG of 2000 x 2000) to the size probe, the Canny preview and
    /generate, and pictures within the limit (1024 x 1024 RGBA) to the Canny preview, eight at a time. The
    server's peak resident set (VmHWM, reset first) grows by less than DECODE_BOUND. (Before: the JPEG alone
    cost 1.5 GB and three took the resident set from 3.0 to 6.25 GB.)"""
    import concurrent.futures

    deep = io.BytesIO()
    Image.new("I;16", (2000, 2000)).save(deep, "PNG")
    full = io.BytesIO()
    Image.effect_noise((1024, 1024), 64).convert("RGBA").save(full, "PNG")
    bombs = [upload(server, "bomb.jpg", jpeg_header(9400, 9400)), upload(server, "deep.png", deep.getvalue())]
    fine = upload(server, "full.png", full.getvalue())
    size_probe, canny_preview = page_event(server, "image"), page_event(server, "control-image")
    pid = server["proc"].pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from here on
    before = resident(pid)["VmRSS"]

    def probe(task):
        kind, path = task
        if kind == "size":
            return run_event(server, size_probe, [{"path": path}])[1]["data"][0]
        if kind == "canny":
            return run_event(server, canny_preview, [{"path": path}, True, 1024, 1024])[1]["data"][0]["label"]
        client = Client(server["url"], verbose=False)
        with pytest.raises(AppError) as err:
            client.predict("a fox", steps=1, image={"path": path, "meta": {"_type": "gradio.FileData"}},
                           api_name="/generate")
        return str(err.value)

    tasks = [(kind, bomb) for bomb in bombs for kind in ("size", "canny", "generate")] * 2 + [("canny", fine)] * 8
    with concurrent.futures.ThreadPoolExecutor(len(tasks)) as pool:
        answers = list(pool.map(probe, tasks))
    grown = resident(pid)["VmHWM"] - before
    print(f"decode probes: peak resident set {grown / 2**20:.0f} MiB over {before / 2**20:.0f} MiB")
    assert grown < DECODE_BOUND, f"{grown / 2**20:.0f} MiB"
    assert all(a == {"__type__": "update"} for (kind, _), a in zip(tasks, answers) if kind == "size")
    refusals = [a for (kind, path), a in zip(tasks, answers) if path in bombs and kind != "size"]
    assert all("is more than this server decodes" in a for a in refusals), refusals
    # phase 1 of a 1024 x 1024 run on the 256 px model: 256 x 256
    assert all(a == "Canny edges, 256×256" for (_, path), a in zip(tasks, answers) if path == fine), answers


def test_requests_are_served_in_order_and_past_the_queue_length_refused_with_a_reason(server):
    """Twenty requests queued behind a longer one are answered in the order sent; one more is refused at once
    (--max-queue), saying why."""
    client, outputs = server["client"], server["outputs"]
    first = client.submit("a fox", width=768, height=384, steps=8, seed=30, api_name="/generate")
    wait_for(lambda: first.status().code.name == "PROCESSING", 30, "the first request to run")
    jobs = []
    for seed in range(31, 31 + MAX_QUEUE):
        jobs.append(client.submit("a fox", width=256, height=256, steps=1, seed=seed, api_name="/generate"))
        wait_for(lambda: jobs[-1].status().code.name in ("IN_QUEUE", "PROCESSING", "FINISHED"), 10, "queued")
    extra = client.submit("a fox", width=256, height=256, steps=1, seed=99, api_name="/generate")
    with pytest.raises(Exception, match="[Qq]ueue is full"):
        extra.result(timeout=30)
    for job in [first, *jobs]:
        job.result(timeout=120)
    numbers = {int(p.name[:5]): int(p.name[6:].split(".")[0]) for p in outputs.glob("*.png")
               if re.fullmatch(r"\d{5}-\d+\.png", p.name)}
    order = [seed for _, seed in sorted(numbers.items()) if 30 <= seed < 31 + MAX_QUEUE]
    assert order == list(range(30, 31 + MAX_QUEUE)) and 99 not in numbers.values()


def answer(url: str, method: str, path: str, host: str | None = None, body: bytes | None = None,
           headers: dict | None = None) -> tuple[int, bytes]:
    """A raw request with the Host header given (http.client sends what it is told)."""
    port = int(url.rsplit(":", 1)[1].strip("/"))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest(method, path, skip_host=True)
    for name, value in {"Host": host or f"127.0.0.1:{port}", **(headers or {})}.items():
        connection.putheader(name, value)
    connection.putheader("Content-Length", str(len(body or b"")))
    connection.endheaders(body)
    reply = connection.getresponse()
    status, content = reply.status, reply.read()
    connection.close()
    return status, content


def test_a_request_naming_another_host_is_refused_on_every_route(server):
    """DNS rebinding: a page elsewhere points its own name at 127.0.0.1 and drives the app from its visitor's
    browser; every such request names that other host. (Before: answered, a file read, with forged Host and
    Origin headers.)"""
    url, port = server["url"], int(server["url"].rsplit(":", 1)[1].strip("/"))
    server["client"].predict("a fox", width=256, height=256, steps=1, seed=40, api_name="/generate")
    png_path = next(server["outputs"].glob("*-40.png"))
    join = json.dumps({"data": [], "fn_index": 0, "session_hash": "x"}).encode()
    routes = [("GET", "/", None), ("GET", "/config", None), ("GET", "/gradio_api/info", None),
              ("POST", "/gradio_api/upload", b"--b--\r\n"), ("POST", "/gradio_api/queue/join", join),
              ("POST", "/gradio_api/run/predict", join), ("GET", f"/gradio_api/file={png_path}", None)]
    for forged in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::2]"):
        for method, path, body in routes:
            status, reply = answer(url, method, path, forged, body, {"Origin": f"http://{forged}"})
            assert status == 421 and b"not a name of this server" in reply, (forged, path, status)
    for named in (f"127.0.0.1:{port}", f"localhost:{port}", "tunnel.example"):
        assert answer(url, "GET", "/", named)[0] == 200
        assert answer(url, "GET", f"/gradio_api/file={png_path}", named)[0] == 200


def test_a_login_keeps_an_anonymous_client_out_of_the_page_and_the_api(server, tmp_path):
    """--auth-file: without the login, neither the page's app nor /generate nor an upload; with it, /generate
    runs. When this server stops, its upload folder goes."""
    logins = tmp_path / "logins"
    logins.write_text("ann:open sesame\n")
    env = {**os.environ, "TMPDIR": str(server["tmp"]), "OMP_NUM_THREADS": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    (tmp_path / "work").mkdir()
    log = tmp_path / "app.log"
    weights = server["root"] / "work" / "weights" / "tiny_sdxl.safetensors"
    proc, url = start_ui(weights, tmp_path / "work", log, env, "--auth-file", str(logins))
    try:
        serving(proc, url, log)
        status, page = answer(url, "GET", "/")
        assert b"Drop a picture" not in page and b"tiny_sdxl" not in page  # the login form, not the app
        assert answer(url, "GET", "/config")[0] == 401
        join = json.dumps({"data": ["a fox"], "fn_index": 11, "session_hash": "x"}).encode()
        for path, body in (("/gradio_api/queue/join", join), ("/gradio_api/run/predict", join),
                           ("/gradio_api/call/generate", b'{"data": ["a fox"]}'),
                           ("/gradio_api/upload", b"--b--\r\n")):
            assert answer(url, "POST", path, body=body, headers={"Content-Type": "application/json"})[0] == 401, path
        with pytest.raises(Exception):
            Client(url, verbose=False)
        client = Client(url, auth=("ann", "open sesame"), verbose=False, download_files=str(tmp_path / "client"))
        files, summary = client.predict("a fox", width=256, height=256, steps=1, api_name="/generate")
        assert summary["scales"][0]["width"] == 256
        uploads = Path(re.search(r"uploads in (\S+) while it runs", log.read_text()).group(1))
        assert uploads.is_dir()
    finally:
        stop(proc)
    assert not uploads.exists()


def test_replies_name_no_server_folder(server):
    """A run's summary and a refusal name files by where they lie in the app's folders, not by the server's
    paths. (Before: the summary's settings and latents, and a broken LoRA's refusal, were absolute paths.)"""
    bad = server["root"] / "work" / "weights" / "loras" / "bad.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(64, 4)}, str(bad))
    client, root = server["client"], str(server["root"])
    with pytest.raises(AppError) as err:
        client.predict("a fox", width=256, height=256, steps=1, lora=["bad.safetensors"], api_name="/generate")
    assert str(err.value).startswith("bad.safetensors: does not fit this SDXL model") and root not in str(err.value)
    picture = upload(server, "pic.png", png())
    files, summary = client.predict("a fox", width=512, steps=1, seed=41, lora=["style.safetensors:0.5"],
                                    image={"path": picture, "meta": {"_type": "gradio.FileData"}}, api_name="/generate")
    assert summary["settings"]["lora"] == [["style.safetensors", 0.5]]
    assert re.fullmatch(r"\d{5}-41\.input\.png", summary["settings"]["image"])
    assert re.fullmatch(r"\d{5}-41\.x1\.latent\.safetensors", summary["scales"][0]["latents"])
    assert root not in json.dumps(summary)


def test_generate_takes_the_tables_settings_and_the_older_scheduler_name(server):
    """/generate's keywords are the table's rows: a sampling setting by its name, the sampler also by its older
    name (scheduler=), both at once refused in one line."""
    client = server["client"]
    _, summary = client.predict("a fox", width=256, height=256, steps=2, seed=42, scheduler="euler",
                                api_name="/generate")
    assert (summary["settings"]["sampler"], summary["settings"]["schedule"]) == ("euler", "leading")
    _, summary = client.predict("a fox", width=256, height=256, steps=2, seed=43, sampler="DPM++ 2M",
                                guidance=1.0, api_name="/generate")
    assert (summary["settings"]["sampler"], summary["settings"]["schedule"]) == ("dpmpp_2m", "karras")
    with pytest.raises(AppError, match="^scheduler is the older name of sampler: give sampler alone$"):
        client.predict("a fox", width=256, height=256, steps=1, sampler="ddim", scheduler="euler", api_name="/generate")
