"""The pieces of a multi-host deployment that need no Flower processes: ``ecavg doctor``, the Fleet gateway, and how
``ecavg deploy submit`` explains a run left pending. Fast: in-process TLS servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="credentials need the cryptography package (a Flower dependency)")

import ecavg.certs  # noqa: E402
from ecavg.certs import make_credentials  # noqa: E402
from ecavg.deploy.drivers import pending_reason, wait_until_started  # noqa: E402
from ecavg.deploy.gateway import REFUSAL_PHRASE, make_gateway  # noqa: E402
from ecavg.deploy.processes import free_ports  # noqa: E402
from ecavg.doctor import Report, check_executables, check_node_key, check_server_certificate, check_superlink_address  # noqa: E402,E501
from ecavg.errors import DeployError  # noqa: E402


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    return make_credentials(tmp_path_factory.mktemp("creds"), hosts=["link.example.org"], num_nodes=1)


@pytest.fixture(scope="module")
def creds_without_loopback(tmp_path_factory):
    """What an older `ecavg certs` (or a hand-made certificate) gave: no 127.0.0.1 in the SuperLink certificate."""
    original = ecavg.certs.LOOPBACK_HOSTS
    ecavg.certs.LOOPBACK_HOSTS = ()
    try:
        return make_credentials(tmp_path_factory.mktemp("old"), hosts=["localhost"])
    finally:
        ecavg.certs.LOOPBACK_HOSTS = original


# ---------------------------------------------------------------------------------------------------
# In-process servers: a stand-in SuperLink (TLS, records requests) and the gateway in front of it
# ---------------------------------------------------------------------------------------------------


class FakeSuperLink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn
    seen: list[tuple[str, str, str, bytes]] = []

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.seen.append(("GET", self.path, self.headers.get("X-Forwarded-For", ""), b""))
        self._answer(b'{"status": "ok"}')

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.seen.append(("POST", self.path, self.headers.get("X-Forwarded-For", ""), body))
        self._answer(b"echo:" + body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def superlink(creds) -> Iterator[int]:
    port = free_ports(1)[0]
    server = ThreadingHTTPServer(("127.0.0.1", port), FakeSuperLink)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(creds.server_cert), str(creds.server_key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    FakeSuperLink.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def gateway(creds, superlink) -> Iterator[int]:
    """The gateway, serving in a thread of its own, in front of the stand-in SuperLink."""
    port = free_ports(1)[0]
    gw = make_gateway(f"127.0.0.1:{port}", f"127.0.0.1:{superlink}", certfile=creds.server_cert,
                      keyfile=creds.server_key, root_certificates=creds.ca_cert)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def main() -> None:
        started = asyncio.Event()
        serving = asyncio.ensure_future(gw.serve(started))
        await started.wait()
        ready.set()
        try:
            await serving
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30), "the gateway did not start"
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(lambda: [task.cancel() for task in asyncio.all_tasks(loop)])
        thread.join(10)
        loop.close()


def _client(port: int, creds) -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=str(creds.ca_cert))
    return http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)


# ---------------------------------------------------------------------------------------------------
# The gateway
# ---------------------------------------------------------------------------------------------------


def test_the_gateway_forwards_the_fleet_api_on_one_connection_and_refuses_the_rest(creds, superlink, gateway):
    conn = _client(gateway, creds)
    for body in (b"first", b"x" * 300_000):  # two requests on one kept-alive connection, one body of many chunks
        conn.request("POST", "/v1/fleet/pull-messages", body=body,
                     headers={"Content-Type": "application/protobuf", "X-Forwarded-For": "6.6.6.6"})
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b"echo:" + body
    # The edge's address replaces whatever it claimed to be.
    assert [(m, p, f) for m, p, f, _ in FakeSuperLink.seen] == [("POST", "/v1/fleet/pull-messages", "127.0.0.1")] * 2

    for method, path in (("POST", "/v1/control/register-node"), ("POST", "/v1/control/start-run"),
                         ("POST", "/v1/runtime/pull-messages"), ("GET", "/health"),
                         ("POST", "/v1/fleet/../control/start-run"), ("POST", "/v1/fleet/pull-messages?x=1")):
        conn = _client(gateway, creds)
        conn.request(method, path, body=b"" if method == "POST" else None)
        response = conn.getresponse()
        assert (response.status, response.reason) == (403, REFUSAL_PHRASE), (method, path)
        assert b"forwards only the Fleet API" in response.read()
    # A body framed by Transfer-Encoding could be read differently by the SuperLink: refused.
    # The gateway answers 411 and closes as soon as it has read the headers, so the client may still be sending the
    # body when the connection goes: that too is a refusal.
    conn = _client(gateway, creds)
    try:
        conn.request("POST", "/v1/fleet/push-messages", body=iter([b"ab", b"cd"]), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        assert conn.getresponse().status == 411
    except (ssl.SSLError, ConnectionError):
        pass
    assert len(FakeSuperLink.seen) == 2, "a refused request reached the SuperLink"


def test_the_gateway_refuses_certificates_it_cannot_load(creds, tmp_path):
    with pytest.raises(DeployError, match="the gateway's certificates cannot be loaded"):
        make_gateway("127.0.0.1:1", "127.0.0.1:2", certfile=tmp_path / "missing.crt", keyfile=creds.server_key,
                     root_certificates=creds.ca_cert)
    with pytest.raises(DeployError, match="--listen must be HOST:PORT"):
        make_gateway("9092", "127.0.0.1:2", certfile=creds.server_cert, keyfile=creds.server_key,
                     root_certificates=creds.ca_cert)


# ---------------------------------------------------------------------------------------------------
# ecavg doctor
# ---------------------------------------------------------------------------------------------------


def _problems(report: Report) -> str:
    return "\n".join(f.text for f in report.problems)


def test_doctor_checks_the_superlink_certificate(creds, creds_without_loopback):
    report = Report()
    check_server_certificate(report, creds.server_cert, creds.server_key, None, "link.example.org")
    assert not report.problems, _problems(report)

    report = Report()
    check_server_certificate(report, creds_without_loopback.server_cert, creds.server_key, None, "10.0.0.5")
    problems = _problems(report)
    assert "does not cover 127.0.0.1" in problems and "every run stays pending" in problems
    assert "does not cover 10.0.0.5" in problems
    assert "is not the key of" in problems


def test_doctor_checks_a_node_key(creds, tmp_path):
    private, public = creds.node_keys[0]
    report = Report()
    check_node_key(report, private)
    assert not report.problems, _problems(report)

    for path, expected in ((creds.ca_key, "not an unencrypted OpenSSH private key"),
                           (tmp_path / "absent", "cannot be read")):
        report = Report()
        check_node_key(report, path)
        assert expected in _problems(report)
    loose = tmp_path / "edge-9"
    loose.write_bytes(private.read_bytes())
    os.chmod(loose, 0o644)
    other = public.read_bytes().replace(b"ecdsa-sha2-nistp384 ", b"ecdsa-sha2-nistp384 X")
    (tmp_path / "edge-9.pub").write_bytes(other)
    report = Report()
    check_node_key(report, loose)
    assert "readable by other users" in _problems(report) and "is not the public key of" in _problems(report)


def test_doctor_names_missing_executables_and_the_fix(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    report = Report()
    check_executables(report, "superlink")
    problems = _problems(report)
    assert "flower-superexec is not on PATH; Flower starts it by name" in problems
    assert "export PATH=" in problems or "install Flower" in problems


def test_doctor_tells_an_edge_whether_it_reaches_the_gateway_or_the_control_api(creds, superlink, gateway):
    report = Report()
    check_superlink_address(report, "supernode", f"127.0.0.1:{gateway}", creds.ca_cert)
    assert not report.problems and "Fleet gateway" in report.findings[-1].text
    report = Report()
    check_superlink_address(report, "supernode", f"127.0.0.1:{superlink}", creds.ca_cert)
    assert "the SuperLink itself, whose port also serves the Control API" in _problems(report)
    report = Report()
    check_superlink_address(report, "operator", f"127.0.0.1:{gateway}", creds.ca_cert)
    assert "is the Fleet gateway, which refuses `flwr`" in _problems(report)
    report = Report()
    check_superlink_address(report, "supernode", f"127.0.0.1:{free_ports(1)[0]}", creds.ca_cert)
    assert "cannot be reached from this host (nothing listens there)" in _problems(report)


def test_doctor_command_exits_non_zero_on_a_problem(creds, tmp_path, capsys):
    from ecavg.cli import main

    missing = tmp_path / "data"
    assert main(["doctor", "--role", "supernode", "--root-certificates", str(creds.ca_cert), "--auth-key",
                 str(creds.ca_key), "--data-dir", str(missing)]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM  the data dir {missing} does not exist" in out
    assert out.rstrip().splitlines()[-1].endswith("problems")


# ---------------------------------------------------------------------------------------------------
# A run left pending
# ---------------------------------------------------------------------------------------------------


def _fake_flwr(runs: list[dict], calls: list[list[str]]):
    def run_cli(args: list[str], *, timeout: float) -> subprocess.CompletedProcess:
        calls.append(args)
        reply = {"success": True, "runs": runs} if args[0] == "ls" else {"success": True}
        return subprocess.CompletedProcess(args, 0, stdout="Using SuperLink\n" + json.dumps(reply), stderr="")

    return run_cli


def test_a_run_left_pending_is_stopped_with_the_reason(creds_without_loopback, superlink, monkeypatch):
    calls: list[list[str]] = []
    pending = [{"run-id": "7", "status": "pending", "status-details": "N/A"}]
    expected = (r"run 7 is still pending after 0.2 s \(stopped it\): Flower's status details: N/A\. The SuperLink's "
                r"SuperExec, which starts the ServerApp, is not running")
    with pytest.raises(DeployError, match=expected):
        wait_until_started(_fake_flwr(pending, calls), 7, pending_timeout_s=0.2, superlink="127.0.0.1:1",
                           root_certificates=None, poll_s=0.05)
    assert ["stop", "7", "ecavg", "--format", "json"] in calls

    busy = [*pending, {"run-id": "5", "status": "running"}]
    assert "busy with run(s) 5" in pending_reason(7, busy, superlink="127.0.0.1:1", root_certificates=None)
    started = [{"run-id": "7", "status": "running"}]
    assert wait_until_started(_fake_flwr(started, []), 7, pending_timeout_s=5, superlink="x:1",
                              root_certificates=None) == "running"


def test_a_superlink_certificate_without_loopback_is_named_as_the_reason(creds_without_loopback):
    port = free_ports(1)[0]
    server = ThreadingHTTPServer(("127.0.0.1", port), FakeSuperLink)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(creds_without_loopback.server_cert), str(creds_without_loopback.server_key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        reason = pending_reason(7, [], superlink=f"localhost:{port}",
                                root_certificates=creds_without_loopback.ca_cert)
    finally:
        server.shutdown()
        server.server_close()
    assert reason.startswith("the SuperLink's certificate does not cover 127.0.0.1 (it covers localhost)")


def test_the_certificate_always_covers_loopback(creds):
    from cryptography import x509

    from ecavg.doctor import certificate_names

    names = certificate_names(x509.load_pem_x509_certificate(Path(creds.server_cert).read_bytes()))
    assert names == ["link.example.org", "localhost", "127.0.0.1", "::1"]
