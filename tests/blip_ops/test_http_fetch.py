"""blip_ops.http_fetch against a loopback server that injects faults (tests/http_server.py)."""

from __future__ import annotations

import pytest

from blip_ops.http_fetch import FetchError, Fetcher, HttpSettings, Refused, TooLarge, is_public
from tests.http_server import Answer, FaultServer

BODY = bytes(range(256)) * 40  # 10,240 bytes
# Loopback is private: these tests opt in, as a catalog on a private CDN would.
FAST = HttpSettings(timeout=2.0, retries=2, backoff=0.01, allow_private=True)


@pytest.fixture
def server():
    with FaultServer() as srv:
        yield srv


def fetch(url, settings=FAST, limit=None):
    with Fetcher(settings) as fetcher:
        return fetcher.fetch(url, limit)


def test_plain_get_sends_the_user_agent(server):
    url = server.route("/a.jpg", Answer(body=BODY))
    assert fetch(url) == BODY
    assert server.user_agents == [FAST.user_agent]
    assert "blip-moderate" in FAST.user_agent


def test_404_is_an_error_without_the_body(server):
    url = server.route("/gone.jpg", Answer(404, b"SECRET-ERROR-PAGE"))
    with pytest.raises(FetchError) as info:
        fetch(url)
    assert str(info.value) == "http 404"
    assert server.requests["/gone.jpg"] == 1  # a 404 is not retried


def test_500_then_200_is_retried(server):
    url = server.route("/flaky.jpg", Answer(500, b"oops"), Answer(500, b"oops"), Answer(body=BODY))
    assert fetch(url) == BODY
    assert server.requests["/flaky.jpg"] == 3


def test_500_past_the_retries_says_how_often(server):
    url = server.route("/down.jpg", Answer(503, b"SECRET-ERROR-PAGE"))
    with pytest.raises(FetchError) as info:
        fetch(url)
    assert str(info.value) == "http 503 after 2 retries"
    assert server.requests["/down.jpg"] == 3


def test_429_honours_retry_after(server, monkeypatch):
    waits = []
    monkeypatch.setattr("blip_ops.http_fetch._sleep", waits.append)
    url = server.route("/busy.jpg", Answer(429, headers={"Retry-After": "7"}), Answer(body=BODY))
    assert fetch(url) == BODY
    assert waits == [7.0]  # the server's figure, not the backoff's 0.01 s


def test_retry_after_beyond_the_cap_fails_at_once(server, monkeypatch):
    monkeypatch.setattr("blip_ops.http_fetch._sleep", lambda s: pytest.fail("must not wait"))
    url = server.route("/later.jpg", Answer(429, headers={"Retry-After": "3600"}))
    with pytest.raises(FetchError, match=r"http 429 \(Retry-After 3600 s is longer than 60 s\)"):
        fetch(url)


def test_slow_body_times_out(server):
    # Each byte arrives well inside the read timeout; the attempt's deadline still cuts it off.
    url = server.route("/slow.jpg", Answer(body=b"x" * 200, trickle=0.05))
    with pytest.raises(FetchError) as info:
        fetch(url, HttpSettings(timeout=1.0, retries=2, allow_private=True))
    assert str(info.value) == "timed out after 1 s"
    assert server.requests["/slow.jpg"] == 1  # a timeout is not retried: the server answered, slowly


def test_slow_answer_times_out(server):
    url = server.route("/stall.jpg", Answer(body=BODY, delay=3.0))
    with pytest.raises(FetchError, match="^timed out after 0.5 s$"):
        fetch(url, HttpSettings(timeout=0.5, retries=0, allow_private=True))


def test_redirects_are_followed(server):
    target = server.route("/real.jpg", Answer(body=BODY))
    first = server.route("/r1", Answer(302, headers={"Location": "/r2"}))
    server.route("/r2", Answer(301, headers={"Location": target}))
    assert fetch(first) == BODY


def test_too_many_redirects(server):
    url = server.route("/loop", Answer(302, headers={"Location": "/loop"}))
    with pytest.raises(FetchError, match=r"too many redirects \(more than 5\)"):
        fetch(url)
    assert server.requests["/loop"] == 6


def test_redirect_to_another_scheme_is_refused(server):
    url = server.route("/to-file", Answer(302, headers={"Location": "file:///etc/passwd"}))
    with pytest.raises(FetchError, match="redirected to a non-HTTP URL"):
        fetch(url)


def test_truncated_body_is_retried_then_reported(server):
    url = server.route("/cut.jpg", Answer(body=BODY, truncate=100))
    with pytest.raises(FetchError, match="^truncated body after 2 retries$"):
        fetch(url)
    assert server.requests["/cut.jpg"] == 3
    server.route("/cut-once.jpg", Answer(body=BODY, truncate=100), Answer(body=BODY))
    assert fetch(server.url("/cut-once.jpg")) == BODY


def test_content_length_over_the_limit_is_refused_unread(server):
    url = server.route("/big.jpg", Answer(body=BODY))
    with pytest.raises(TooLarge) as info:
        fetch(url, limit=1000)
    assert info.value.size == len(BODY)
    assert str(info.value) == f"image of {len(BODY)} bytes exceeds the limit of 1000 bytes"


def test_body_without_length_is_cut_off_at_the_limit(server):
    url = server.route("/stream.jpg", Answer(body=BODY, no_length=True))
    with pytest.raises(TooLarge) as info:
        fetch(url, limit=1000)
    assert info.value.size is None
    assert fetch(url, limit=len(BODY)) == BODY  # exactly the limit is fine


def test_lying_content_length_is_still_bounded(server):
    url = server.route("/liar.jpg", Answer(body=BODY, claimed_length=10, no_length=False))
    # urllib3 reads at most the stated length: the body is what the server said it is.
    with Fetcher(FAST) as fetcher:
        data = fetcher.fetch(url, limit=1000)
    assert len(data) <= 1000


def test_loopback_is_refused_by_default(server):
    url = server.route("/a.jpg", Answer(body=BODY))
    with pytest.raises(Refused) as info:
        fetch(url, HttpSettings())
    assert str(info.value) == "refused: private address (127.0.0.1)"
    assert server.requests["/a.jpg"] == 0  # refused before connecting: no request ever sent
    # A name that resolves to loopback is refused the same way.
    with pytest.raises(Refused, match="^refused: private address"):
        fetch(server.url("/a.jpg", host="localhost"), HttpSettings())


def test_redirect_to_a_private_address_is_refused(server, monkeypatch):
    # The first hop is "public" (the guard is told so), the redirect points at the metadata address.
    import blip_ops.http_fetch as H

    real = H.is_public
    monkeypatch.setattr(H, "is_public", lambda a: a == "127.0.0.1" or real(a))
    url = server.route("/hop", Answer(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}))
    with pytest.raises(Refused, match=r"^refused: private address \(169\.254\.169\.254\)$"):
        fetch(url, HttpSettings(retries=0))
    assert server.requests["/hop"] == 1


def test_the_connected_peer_is_checked(server, monkeypatch):
    # The name resolves to a public address, but the socket reaches loopback (a rebinding or a
    # resolver that lies): the peer check refuses it before any request is sent.
    import socket

    import blip_ops.http_fetch as H

    monkeypatch.setattr(H.socket, "getaddrinfo", lambda host, port, *a: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))])
    real = H.is_public
    calls = []

    def first_public(address):
        calls.append(address)
        return len(calls) == 1 or real(address)  # the look-up passes, the connected peer does not

    monkeypatch.setattr(H, "is_public", first_public)
    url = server.route("/a.jpg", Answer(body=BODY))
    with pytest.raises(Refused, match=r"^refused: private address \(127\.0\.0\.1\)$"):
        fetch(url, HttpSettings(retries=0))
    assert calls == ["127.0.0.1", "127.0.0.1"]
    assert server.requests["/a.jpg"] == 0


@pytest.mark.parametrize("address, public", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("::1", False),
    ("fe80::1", False), ("fd00::1", False), ("::ffff:127.0.0.1", False), ("224.0.0.1", False),
    ("8.8.8.8", True), ("2606:4700::1111", True),
])
def test_public_addresses(address, public):
    assert is_public(address) is public


def test_unresolvable_host(server):
    with pytest.raises(FetchError, match="^cannot resolve host no-such-host.invalid$"):
        fetch("http://no-such-host.invalid/a.jpg", HttpSettings(retries=0))


def test_connection_refused_is_retried(server):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FetchError, match="^cannot connect after 2 retries$"):
        fetch(f"http://127.0.0.1:{port}/a.jpg")


def test_fetch_many_fetches_each_url_once(server):
    urls = [server.route(f"/{i}.jpg", Answer(body=bytes([i]) * 10)) for i in range(5)]
    missing = server.url("/missing.jpg")
    with Fetcher(HttpSettings(concurrency=3, allow_private=True)) as fetcher:
        got = fetcher.fetch_many(urls * 3 + [missing, missing])
    assert {u: got[u] for u in urls} == {u: bytes([i]) * 10 for i, u in enumerate(urls)}
    assert str(got[missing]) == "http 404"
    assert all(server.requests[f"/{i}.jpg"] == 1 for i in range(5))
    assert server.requests["/missing.jpg"] == 1
