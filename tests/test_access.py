"""Who may use the web UI (minifusion.access): the Host rule against DNS rebinding, logins, and the notice that
the server is open to the network."""
import asyncio

import pytest

from minifusion.access import HostCheck, allowed_hosts, exposure_notice, host_name, logins, reachable_from_network


def test_only_loopback_addresses_stay_off_the_network():
    assert not any(map(reachable_from_network, ["127.0.0.1", "::1", "localhost", "127.0.1.1"]))
    assert all(map(reachable_from_network, ["0.0.0.0", "::", "192.168.1.5", "myhost.local"]))


def test_a_host_header_names_a_host_with_or_without_its_port():
    assert [host_name(h) for h in ("127.0.0.1:7860", "LocalHost", "[::1]:7860", "example.com.:80", "::1", "")] == \
        ["127.0.0.1", "localhost", "::1", "example.com", "::1", ""]


def test_requests_must_name_the_address_served_or_an_allowed_name():
    local = allowed_hosts("127.0.0.1", ["tunnel.example"])
    assert all(map(local, ["127.0.0.1", "localhost", "tunnel.example"]))
    assert not any(map(local, ["evil.example", "192.168.1.5", "", "127.0.0.1.evil.example"]))
    lan = allowed_hosts("192.168.1.5")
    assert lan("192.168.1.5") and not lan("localhost") and not lan("10.0.0.1")
    everywhere = allowed_hosts("0.0.0.0")
    assert all(map(everywhere, ["localhost", "10.1.2.3", "fe80::1"])) and not everywhere("evil.example")


def asgi(app, host: bytes | None) -> list[dict]:
    """The messages `app` sends for a GET / with that Host header."""
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    headers = [] if host is None else [(b"host", host)]
    asyncio.run(app({"type": "http", "method": "GET", "path": "/", "headers": headers}, receive, send))
    return sent


def test_the_host_check_refuses_other_names_before_the_app_sees_them():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    checked = HostCheck(app, allowed_hosts("127.0.0.1"))
    assert asgi(checked, b"127.0.0.1:7860")[0]["status"] == 200
    for forged in (b"evil.example", b"evil.example:7860", None):
        start, body = asgi(checked, forged)
        assert start["status"] == 421 and b"not a name of this server; start it with --allowed-host" in body["body"]


def test_logins_come_from_flags_and_a_file(tmp_path):
    file = tmp_path / "logins"
    file.write_text("# who may use it\nann:secret:with:colons\n\n  bob:pw  \n")
    assert logins(["cy:x"], file) == [("cy", "x"), ("ann", "secret:with:colons"), ("bob", "pw")]
    assert logins([]) == []
    for given, path, message in ((["nopassword"], None, "--auth 'nopassword': expected USER:PASSWORD"),
                                 ([":pw"], None, "expected USER:PASSWORD"),
                                 ([], tmp_path / "missing", "--auth-file .*missing: cannot read it")):
        with pytest.raises(ValueError, match=message):
            logins(given, path)
    file.write_text("ann\n")
    with pytest.raises(ValueError, match="line 1: expected USER:PASSWORD"):
        logins([], file)


def test_the_notice_is_for_a_server_open_to_the_network_without_a_login():
    assert exposure_notice("127.0.0.1", 7860, login=False) is None
    assert exposure_notice("0.0.0.0", 7860, login=True) is None
    assert "port 7860" in exposure_notice("0.0.0.0", 7860, login=False)
