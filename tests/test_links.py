"""Edge conditions for ``ecavg deploy local``: ``--link NAME=RATE`` (namespaces, veth pairs, tc tbf) and
``--edge-cpu NAME=SHARE`` (cgroup CPU quotas).

* the option parsers (``ecavg.deploy.rates``, shared with ``ecavg plan``) and the refusals, everywhere;
* as root with ``ip netns``, ``tc`` and a cpu cgroup: a shaped link carries its rate, and what a launcher made is
  deleted by its watchdog when the launcher dies without cleaning up, and by the next launcher when the watchdog
  died too;
* ``deploy``: two quickstart edges behind shaped links, one also at half a core, reproduce the embedded
  run's server weights bit for bit, the server's timing shows the straggler, and nothing is left afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ecavg.deploy import reaper
from ecavg.deploy.conditions import CpuShares, EdgeConditions, cpu_limit_unavailable_reason
from ecavg.deploy.links import ShapedLinks, links_unavailable_reason, netns_command, tbf_arguments
from ecavg.deploy.rates import format_rate, parse_cpu_share, parse_edge_values, parse_rate, tc_rate
from ecavg.deploy.workdir import LOCK_FILE, WorkDir, remove_stale_workdirs
from ecavg.errors import ConfigError, DeployError

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.toml"


def _machine_reason() -> str | None:
    return links_unavailable_reason() or cpu_limit_unavailable_reason()


needs_links = pytest.mark.skipif(_machine_reason() is not None, reason=str(_machine_reason()))


# ---------------------------------------------------------------------------------------------------
# Parsing and refusals
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "bps"), [
    ("10mbit", 10_000_000), ("500kbit", 500_000), ("1mbit", 1_000_000), ("1.5mbit", 1_500_000),
    ("2mbps", 16_000_000), ("1kbps", 8_000), ("10Mbit", 10_000_000), ("1.5MBIT", 1_500_000), ("2gbit", 2 * 10**9),
    ("8kbit", 8_000), ("8000bit", 8_000), ("10gbit", 10_000_000_000), (" 20mbit ", 20_000_000), (".5mbit", 500_000),
    ("0.57mbit", 570_000),  # 0.57 * 10**6 is 569999.99... in floating point: rounded, not truncated
])
def test_rates_are_read_as_tc_writes_them(text, bps):
    assert parse_rate(text) == bps and isinstance(parse_rate(text), int)


@pytest.mark.parametrize(("text", "message"), [
    ("fast", "is not a rate"), ("10", "is not a rate"), ("mbit", "is not a rate"), ("-1mbit", "is not a rate"),
    ("10 mbit", "is not a rate"), ("10mbitz", "is not a rate"), ("10mb", "is not a rate"), ("1tbit", "is not a rate"),
    ("1e3kbit", "is not a rate"), ("", "is not a rate"), ("0mbit", "out of range"), ("0.5bit", "out of range"),
    ("7kbit", "out of range"), ("11gbit", "out of range"), ("9" * 400 + "mbit", "out of range"),
])
def test_a_bad_rate_is_refused_naming_it(text, message):
    with pytest.raises(ConfigError, match=f"^--link: .*{message}") as caught:
        parse_rate(text)
    assert repr(text) in str(caught.value) and "\n" not in str(caught.value)


def test_rates_are_written_back_short_and_read_back_the_same():
    rates = (20_000_000, 500_000, 1_500_000, 8_000, 1_234_567, 10**10, 12)
    assert [format_rate(b) for b in rates] == ["20mbit", "500kbit", "1.5mbit", "8kbit", "1.234567mbit", "10gbit",
                                               "12bit"]
    assert all(parse_rate(format_rate(b)) == b for b in rates if b >= 8_000)
    assert format_rate(2.5e5) == "250kbit" and format_rate(1_500_000.4) == "1.5mbit"  # floats: whole bits
    assert tc_rate(parse_rate("1.5mbit")) == "1500000bit"


def test_all_applies_to_every_edge_and_a_named_edge_overrides_it_in_any_order():
    for values in (["edge-1=1mbit", "all=20mbit"], ["all=20mbit", "edge-1=1mbit"]):
        assert parse_edge_values(values, flag="--link", num_edges=3, parse=parse_rate) == \
            {0: 20_000_000, 1: 1_000_000, 2: 20_000_000}
    assert parse_edge_values(["edge-2=0.5"], flag="--edge-cpu", num_edges=3, parse=parse_cpu_share) == {2: 0.5}
    assert parse_edge_values([], flag="--link", num_edges=2, parse=parse_rate) == {}


@pytest.mark.parametrize(("values", "message"), [
    (["edge-2=1mbit"], "--link: edge-2 does not exist: the run has 2 edges"),
    (["edge2=1mbit"], "--link: 'edge2' is not an edge name"),
    (["server=1mbit"], "--link: 'server' is not an edge name"),
    (["edge-01=1mbit"], "--link: 'edge-01' is not an edge name"),
    (["edge-0"], "--link: 'edge-0' is not NAME=VALUE"),
    (["=1mbit"], "--link: '=1mbit' is not NAME=VALUE"),
    (["edge-0= "], "--link: 'edge-0= ' is not NAME=VALUE"),
    (["edge-0=1mbit", "edge-0=2mbit"], "--link: edge-0 is given twice"),
    (["all=1mbit", "all=2mbit"], "--link: all= is given twice"),
    (["edge-1=10mb"], "--link edge-1: '10mb' is not a rate"),
    (["all=7kbit"], "--link all: '7kbit' is out of range"),
])
def test_bad_link_options_are_refused(values, message):
    with pytest.raises(ConfigError, match=f"^{message}") as caught:
        parse_edge_values(values, flag="--link", num_edges=2, parse=parse_rate)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("text", "share"), [("0.25", 0.25), ("1", 1.0), ("0.01", 0.01), (" 0.5 ", 0.5)])
def test_cpu_shares_are_fractions_of_a_core(text, share):
    assert parse_cpu_share(text) == share


@pytest.mark.parametrize("text", ["0", "0.001", "-0.5", "quarter", "", str((os.cpu_count() or 1) + 1), "nan", "inf"])
def test_a_bad_cpu_share_is_refused(text):
    with pytest.raises(ConfigError, match="^--edge-cpu: ") as caught:
        parse_cpu_share(text)
    assert repr(text) in str(caught.value) and "\n" not in str(caught.value)


def test_tbf_queues_hold_an_offload_packet_at_any_rate():
    for bps in (8_000, 1_000_000, 20_000_000, 10**9):
        args = tbf_arguments(bps)
        assert args[:3] == ["tbf", "rate", f"{bps}bit"]
        assert int(args[args.index("burst") + 1]) >= 16 * 1024 and int(args[args.index("limit") + 1]) >= 128 * 1024


def test_netns_command_keeps_the_command_and_its_pid():
    assert netns_command(None, ["a", "b"]) == ["a", "b"]
    assert netns_command("ns", ["a"]) == ["ip", "netns", "exec", "ns", "a"]  # ip execs: the pid stays the same


def test_without_root_or_tools_links_and_cpu_shares_are_refused(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "need root" in links_unavailable_reason()
    assert "need root" in cpu_limit_unavailable_reason()
    with pytest.raises(DeployError, match="need root"):
        EdgeConditions.parse(["all=1mbit"], [], num_edges=2)
    with pytest.raises(DeployError, match="need root"):
        EdgeConditions.parse([], ["edge-0=0.5"], num_edges=2)
    assert not EdgeConditions.parse([], [], num_edges=2).active  # nothing asked: nothing needed
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    import shutil

    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "tc" else which(name))
    assert links_unavailable_reason() == ("emulated links (--link) need the tc command (iproute2), which is not "
                                          "installed")


def test_the_cli_refuses_before_anything_starts(monkeypatch, tmp_path, capsys):
    from ecavg.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    out = tmp_path / "run"
    code = main(["deploy", "local", "--config", str(QUICKSTART), "--link", "all=10mbit", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "need root" in err, err
    assert not out.exists()
    code = main(["deploy", "local", "--config", str(QUICKSTART), "--link", "edge-0=10mbits", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("ecavg: error: --link edge-0: '10mbits' is not a rate; write a number and one of "
                                 "bit, kbit, mbit, gbit, bps, kbps, mbps, gbps (e.g. 10mbit, 500kbit; as tc does, *bps "
                                 "are bytes per second)")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# On this machine (root, ip netns, tc, a cpu cgroup)
# ---------------------------------------------------------------------------------------------------


def _left(workdir: Path) -> list[str]:
    """What of ``workdir``'s namespaces, links, loopback address and cgroups still exists."""
    tag = reaper.resource_tag(workdir)
    found = [f"namespace {line.split()[0]}" for line in
             subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
             if line.startswith(f"ecavg-{tag}-")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {name}" for name in links.split() if name.startswith(f"ev{tag}-")]
    lo = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    found += ["loopback address"] * lo.count(f"lo:ec{tag}")
    found += [f"cgroup {p}" for root in reaper.cpu_cgroup_roots() for p in root.glob(f"ecavg-{tag}-*")]
    return found


def _transfer_seconds(namespace: str, host: str, nbytes: int) -> float:
    """Seconds to send ``nbytes`` from ``namespace`` to ``host`` (a listener here), measured at the receiver."""
    server = socket.create_server((host, 0))
    port = server.getsockname()[1]
    took: list[float] = []

    def receive() -> None:
        connection, _ = server.accept()
        started, received = time.monotonic(), 0
        while chunk := connection.recv(65536):
            received += len(chunk)
        took.append(time.monotonic() - started)
        assert received == nbytes
        connection.close()

    receiver = threading.Thread(target=receive)
    receiver.start()
    sender = (f"import socket; s = socket.create_connection(({host!r}, {port})); s.sendall(bytes({nbytes})); "
              "s.shutdown(socket.SHUT_WR); s.recv(1)")
    subprocess.run(netns_command(namespace, [sys.executable, "-c", sender]), check=True, timeout=60)
    receiver.join(timeout=60)
    server.close()
    return took[0]


@needs_links
def test_a_shaped_link_carries_its_rate_and_the_watchdog_removes_it_when_the_launcher_dies(tmp_path):
    workdir = WorkDir("deploy", root=tmp_path)
    try:
        conditions = EdgeConditions.parse(["all=2mbit", "edge-1=8mbit"], ["edge-0=0.25"], num_edges=2)
        context = conditions.applied(workdir.path)
        context.__enter__()  # never left: the launcher "dies" with everything in place
        shaped = subprocess.run(["tc", "-n", conditions.namespace(0), "qdisc", "show", "dev", "eth0"],
                                capture_output=True, text=True, check=True).stdout
        assert "tbf" in shaped and "rate 2Mbit" in shaped, shaped
        seconds = _transfer_seconds(conditions.namespace(0), conditions.superlink_host, 500_000)
        expected = 500_000 * 8 / 2e6  # 2 s (plus a few % of headers)
        assert expected * 0.9 < seconds < expected * 1.5, f"500 kB over 2mbit took {seconds:.2f} s"
        assert (conditions.cgroup(0) / "cgroup.procs").exists() and conditions.cgroup(1) is None
        assert len(_left(workdir.path)) == 2 + 2 + 1 + 1
        workdir.watchdog.stdin.close()  # what the kernel does when the launcher is killed
        workdir.watchdog.wait(timeout=60)
        assert _left(workdir.path) == []
        assert not workdir.path.exists()
    finally:
        workdir.close()
        reaper.remove_tagged_resources(workdir.path)


@needs_links
def test_the_next_launcher_removes_what_a_killed_launcher_and_watchdog_left(tmp_path):
    stale = tmp_path / "ecavg-deploy-stale"
    stale.mkdir()
    (stale / LOCK_FILE).touch()  # nobody holds its lock
    try:
        ShapedLinks(stale, 2, {0: 10**6, 1: None}).__enter__()
        CpuShares(stale, {1: 0.5}).__enter__()
        assert len(_left(stale)) == 2 + 2 + 1 + 1
        assert remove_stale_workdirs(tmp_path) == [stale]
        assert _left(stale) == []
    finally:
        reaper.remove_tagged_resources(stale)


# ---------------------------------------------------------------------------------------------------
# A deployment behind shaped links
# ---------------------------------------------------------------------------------------------------


def _tiny_quickstart() -> dict:
    from ecavg.config import load_toml

    user = load_toml(QUICKSTART)
    user["name"] = "links"
    user["threads"] = 1
    user["edge"] = {**user.get("edge", {}), "epochs": 1}
    user["server"] = {**user.get("server", {}), "epochs": 1}
    return user


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.deploy
@needs_links
def test_two_edges_behind_shaped_links_reproduce_the_embedded_run_and_leave_nothing(tmp_path):
    pytest.importorskip("flwr", reason="the Flower runtime needs the flower extra (pip install -e '.[flower]')")
    from ecavg.config import resolve_config
    from ecavg.deploy import deploy_local
    from ecavg.experiment import run_experiment

    user = _tiny_quickstart()
    seen: dict = {}

    def look(federation) -> None:
        seen["workdir"] = federation.workdir
        seen["host"] = federation.host
        root = os.readlink("/proc/self/ns/net")
        for k in (0, 1):
            pid = federation.processes[f"edge-{k}"].pid
            # The process starts as `ip netns exec`, which enters the namespace before it execs the SuperNode.
            deadline = time.monotonic() + 60
            while os.readlink(f"/proc/{pid}/ns/net") == root and time.monotonic() < deadline:
                time.sleep(0.1)
            seen[f"edge-{k} netns"] = os.readlink(f"/proc/{pid}/ns/net")
            seen[f"edge-{k} cgroup"] = Path(f"/proc/{pid}/cgroup").read_text()
        seen["root netns"] = os.readlink("/proc/self/ns/net")

    results = deploy_local(user, edges=2, output_dir=tmp_path / "shaped", timeout_s=900, on_started=look,
                           links=["all=20mbit", "edge-1=1mbit"], edge_cpu=["edge-1=0.5"])
    out = Path(results["output_dir"])
    workdir = seen["workdir"]
    tag = reaper.resource_tag(workdir)
    # Each SuperNode ran in a namespace of its own; edge-1 in its cgroup; the SuperLink on the links' address.
    assert len({seen["edge-0 netns"], seen["edge-1 netns"], seen["root netns"]}) == 3
    assert f"ecavg-{tag}-edge-1" in seen["edge-1 cgroup"] and f"ecavg-{tag}-" not in seen["edge-0 cgroup"]
    assert seen["host"].startswith("10.232.")
    conditions = json.loads((out / "deploy" / "edge_conditions.json").read_text())
    assert conditions["links"]["edges"]["edge-1"]["rate"] == "1mbit" and conditions["edge_cpu"] == {"edge-1": 0.5}
    assert results["deploy"]["links"]["edges"]["edge-0"]["rate"] == "20mbit"
    # Nothing is left: namespaces, links, the address, cgroups, processes.
    assert _left(workdir) == []
    assert reaper.tagged_processes(workdir) == set()
    # The server times every edge's reply, which is where a straggler shows (its 1 Mbit/s link adds about 22 s of
    # payload to its pre-training reply); how much is measured, not asserted: on a loaded machine both edges'
    # replies wait on the CPU as much as on the link (a quarter of a core, or less, also risks Flower's 60 s
    # ClientApp start-up limit, hence half a core).
    replies = results["deploy"]["reply_s"]["pretrain"]
    assert set(replies) == {"edge-0", "edge-1"} and all(t > 0 for t in replies.values()), results["deploy"]
    # Same numbers as the embedded runtime, bit for bit.
    assert results["missing_edges"] == {}
    run_experiment(resolve_config(user), output_dir=tmp_path / "embedded")
    assert _sha256(out / "server.safetensors") == _sha256(tmp_path / "embedded" / "server.safetensors")


def test_edge_conditions_script_turns_codec_labels_into_settings():
    """scripts/edge_conditions.py --codecs takes the labels the docs' tables print (int8+delta+deflate)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("edge_conditions", REPO / "scripts" / "edge_conditions.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.transfer_settings("fp32") == ["--set=transfer.codec=fp32"]
    assert script.transfer_settings("int8+delta+deflate") == [
        "--set=transfer.codec=int8", "--set=transfer.delta=true", "--set=transfer.deflate=true"]
    with pytest.raises(SystemExit, match="'int8\\+zip' has unknown flag\\(s\\) zip"):
        script.transfer_settings("int8+zip")
