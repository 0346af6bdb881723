"""Who may use the web UI: requests must name this server in their Host header, logins (--auth, --auth-file),
and whether the server is open to the network at all. Gradio-free: the Host check is plain ASGI middleware."""
import ipaddress
import socket
from pathlib import Path
from typing import Callable, Iterable


def reachable_from_network(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def allowed_hosts(host: str, names: Iterable[str] = ()) -> Callable[[str], bool]:
    """Whether a request's Host names this server (host_name's form): the address it listens on (a loopback one
    also as localhost; 0.0.0.0 or :: as any address of the machine by number, localhost and the machine's own
    name), or one of `names` (--allowed-host: a tunnel's or a reverse proxy's public name). A number in the
    Host header cannot be a rebound name: a page elsewhere reaches this server through a name of its own."""
    allowed = {host_name(n) for n in (host, *names)}
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if host == "localhost" or address is not None and address.is_loopback:
        allowed |= {"localhost", "127.0.0.1", "::1"}
    anywhere = address is not None and address.is_unspecified
    if anywhere:
        allowed |= {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}

    return lambda name: name in allowed or anywhere and _is_address(name)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_name(header: str) -> str:
    """The name a Host header gives: without its port or an IPv6 address's brackets, lowercase, no final dot."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".")


class HostCheck:
    """Refuses (421) a request whose Host header does not name this server. A web page elsewhere can point a
    name of its own at this server's address, 127.0.0.1 included (DNS rebinding), and then use the app from
    its visitor's browser as if it were that site; every such request carries that other name."""

    def __init__(self, app, allowed: Callable[[str], bool]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if self.allowed(host_name(host)):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = (f"{host!r} is not a name of this server; start it with --allowed-host NAME to serve it under "
                "another\n").encode()
        await send({"type": "http.response.start", "status": 421,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def logins(given: Iterable[str], file: Path | None = None) -> list[tuple[str, str]]:
    """The (user, password) pairs of --auth USER:PASSWORD and of --auth-file's lines (blank lines and # comments
    skipped); ValueError, in one line, for one that is not USER:PASSWORD. A file keeps passwords out of the
    process list, where every user of the machine reads the command line."""
    entries = [(f"--auth {g!r}", g) for g in given]
    if file is not None:
        try:
            lines = file.read_text().splitlines()
        except OSError as e:
            raise ValueError(f"--auth-file {file}: cannot read it ({e.strerror or e})") from None
        entries += [(f"--auth-file {file}, line {i}", line.strip()) for i, line in enumerate(lines, start=1)
                    if line.strip() and not line.lstrip().startswith("#")]
    pairs = []
    for where, entry in entries:
        user, _, password = entry.partition(":")
        if not user or not password:
            raise ValueError(f"{where}: expected USER:PASSWORD")
        pairs.append((user, password))
    return pairs


def exposure_notice(host: str, port: int, login: bool) -> str | None:
    """What the page says when anyone on the network may use it: no login, and not only this machine's."""
    if login or not reachable_from_network(host):
        return None
    return (f"**Open to the network without a login** (`--host {host}`): anyone who can reach this machine on port "
            f"{port} can generate images here and download every image it has made. Start it with "
            "`--auth-file FILE` (lines `user:password`), and put a tunnel or a reverse proxy with TLS in front of it.")
