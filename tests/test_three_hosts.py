"""A three-host deployment done exactly as docs/deploy.md section 2 says, on Linux network namespaces.

The server (``link``) and two edges (``edge0``, ``edge1``), plus a ``stranger`` host, are network namespaces on a
private subnet that exists only inside them (each joined by a veth pair to a bridge in a hub namespace, links
shaped to 20 Mbit/s). The test reads the fenced ``bash`` blocks of section 2 of docs/deploy.md, whose first line
says where a block runs (``# on: the server host``, ``# on: edge host K``, ...), and runs them in order on those
hosts, with the docs' example names and paths replaced by the test's (``SUBSTITUTIONS``, each of which must occur
in the docs) and ``scp`` copying between the hosts' home directories. Long-running commands (the SuperLink, the
gateway, the SuperNodes) are started in the background. Then:

* the submitted quickstart run (shortened) equals ``ecavg run`` bit for bit (sha256 of server.safetensors);
* a SuperNode with an unregistered key is refused, with the message docs/deploy.md 2.8 quotes;
* an edge host holding what the docs give it cannot register a node nor submit a run.

Everything created (namespaces, links, processes, the temporary directory) is removed, also on failure.
Needs root and ``ip netns``; skipped with the reason otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower runtime needs the flower extra (pip install -e '.[flower]')")

from ecavg.deploy.links import shape  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "deploy.md"
QUICKSTART = REPO / "configs" / "quickstart.toml"
SUBNET = "10.231.0"  # exists only inside the test's namespaces, so parallel runs of this test do not collide
ADDRESSES = {"link": f"{SUBNET}.1", "edge0": f"{SUBNET}.10", "edge1": f"{SUBNET}.11", "stranger": f"{SUBNET}.12"}
SERVER_IP = ADDRESSES["link"]
# Long-running commands (started in the background) -> the name of their output file in the host's logs/.
LONG_RUNNING = {"flower-superlink": "superlink", "flower-supernode": "supernode", "ecavg deploy gateway": "gateway"}
RUN_TIMEOUT_S = float(os.environ.get("ECAVG_TEST_THREE_HOSTS_TIMEOUT_S", "1500"))

pytestmark = pytest.mark.deploy


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"ecavg-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"ip netns is unavailable here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, check=False)
    return None


# ---------------------------------------------------------------------------------------------------
# The docs' commands
# ---------------------------------------------------------------------------------------------------


@dataclass
class Block:
    where: str  # what follows "# on: "
    text: str


def section_two_blocks(markdown: str) -> list[Block]:
    """The ``bash`` blocks of section 2 of docs/deploy.md, in order, with the host each runs on."""
    start = markdown.index("## 2. ")
    end = markdown.index("\n## 3. ", start)
    blocks = []
    for match in re.finditer(r"^```bash\n(.*?)^```", markdown[start:end], flags=re.S | re.M):
        text = match.group(1)
        first = text.split("\n", 1)[0]
        assert first.startswith("# on: "), f"a bash block of docs/deploy.md section 2 says not where it runs: {first}"
        blocks.append(Block(first.removeprefix("# on: ").strip(), text))
    return blocks


def join_continuations(text: str) -> list[str]:
    """Shell lines with backslash continuations joined (heredocs are left as they are)."""
    return text.replace("\\\n", " ").split("\n")


def background_long_running(text: str, log_dir: str) -> tuple[str, list[str]]:
    """The block with each long-running command started in the background, its output in ``log_dir``."""
    lines, started = [], []
    for line in join_continuations(text):
        command = line.strip()
        name = next((n for n in LONG_RUNNING if command.startswith(n)), None)
        if name is None:
            lines.append(line)
            continue
        label = LONG_RUNNING[name]
        started.append(label)
        lines.append(f"( exec {command} ) > {log_dir}/{label}.out 2>&1 < /dev/null &")
    return "\n".join(lines), started


# ---------------------------------------------------------------------------------------------------
# The hosts
# ---------------------------------------------------------------------------------------------------


@dataclass
class Lab:
    root: Path
    prefix: str
    namespaces: list[str] = field(default_factory=list)
    runs: int = 0

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def home(self, host: str) -> Path:
        return self.root / host

    def env(self, host: str) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        home = self.home(host)
        return {"PATH": f"{venv_bin}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "PYTHONPATH": str(REPO),
                "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "TMPDIR": str(home / "tmp"),
                "COLUMNS": "200"}

    def command(self, host: str, script: str) -> list[str]:
        prefix = [] if host == "trusted" else ["ip", "netns", "exec", self.ns(host)]
        return [*prefix, "bash", "-c", script]

    def run(self, host: str, script: str, *, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``script`` on ``host`` and wait for it (not for helpers it left behind: output goes to files, since a
        helper Flower detaches, e.g. a SuperExec, keeps a pipe open after its SuperNode exited)."""
        self.runs += 1
        out, err = (self.home(host) / "logs" / f"run-{self.runs}.{kind}" for kind in ("stdout", "stderr"))
        with out.open("w") as stdout, err.open("w") as stderr:
            process = subprocess.run(self.command(host, script), env=self.env(host), cwd=self.home(host),
                                     stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, timeout=timeout,
                                     check=False)
        result = subprocess.CompletedProcess(process.args, process.returncode, out.read_text(errors="replace"),
                                             err.read_text(errors="replace"))
        if check and result.returncode != 0:
            raise AssertionError(f"on {host}, exit status {result.returncode}:\n{script}\n--- output:\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}\n{self.logs()}")
        return result

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted(self.root.glob("*/logs/*.out")):
            parts.append(f"--- {path.relative_to(self.root)}:\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def listening(self, host: str, port: int) -> bool:
        result = subprocess.run(["ip", "netns", "exec", self.ns(host), "ss", "-ltnH"], capture_output=True,
                                text=True, check=False)
        return re.search(rf":{port}\s", result.stdout) is not None

    def wait_listening(self, host: str, port: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.listening(host, port):
                return
            time.sleep(1)
        raise AssertionError(f"nothing listens on {host}:{port} after {timeout:g} s\n{self.logs()}")


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def _build(lab: Lab) -> None:
    hub = lab.ns("hub")
    _sh("ip", "netns", "add", hub)
    lab.namespaces.append(hub)
    _sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
    _sh("ip", "-n", hub, "link", "set", "br0", "up")
    for host, address in ADDRESSES.items():
        ns = lab.ns(host)
        _sh("ip", "netns", "add", ns)
        lab.namespaces.append(ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        # Both ends are created inside namespaces: nothing of the test's appears in the root namespace.
        _sh("ip", "-n", hub, "link", "add", f"v-{host}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "-n", hub, "link", "set", f"v-{host}", "master", "br0")
        _sh("ip", "-n", hub, "link", "set", f"v-{host}", "up")
        _sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        if shutil.which("tc"):  # 20 Mbit/s links, as between sites (tbf as `ecavg deploy local --link` shapes)
            shape("eth0", 20_000_000, namespace=ns)
    for host in [*ADDRESSES, "trusted"]:
        (lab.home(host) / "logs").mkdir(parents=True)
        (lab.home(host) / "tmp").mkdir()


def _stop_namespace_processes(namespaces: list[str]) -> list[int]:
    """SIGTERM every process in the namespaces (the SuperLink, SuperNodes, gateway and every helper Flower started),
    SIGKILL what is left after 10 s. Returns the pids found."""
    def pids() -> set[int]:
        found = set()
        for ns in namespaces:
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
            found |= {int(p) for p in out.split()}
        return found

    found = pids()
    for pid in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(found)


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    lab = Lab(Path(tempfile.mkdtemp(prefix="ecavg-three-hosts-")), f"ecavg3h{os.getpid()}")
    try:
        _build(lab)
        yield lab
    finally:
        _stop_namespace_processes(lab.namespaces)
        time.sleep(0.5)
        for ns in reversed(lab.namespaces):  # deleting a namespace deletes its links and the bridge
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
        shutil.rmtree(lab.root, ignore_errors=True)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
        assert lab.prefix not in listed, f"namespaces left behind: {listed}"


# ---------------------------------------------------------------------------------------------------


def _tiny_quickstart(path: Path) -> dict:
    import tomli_w

    from ecavg.config import load_toml

    user = load_toml(QUICKSTART)
    user["threads"] = 1
    user["edge"] = {**user.get("edge", {}), "epochs": 1}
    user["server"] = {**user.get("server", {}), "epochs": 1}
    path.write_text(tomli_w.dumps(user))
    user.setdefault("name", "quickstart")
    return user


def _substitutions(lab: Lab, config: Path) -> dict[str, str]:
    """The docs' example names and paths -> the test's; each must occur in section 2 (else the docs changed)."""
    return {"link.example.org": SERVER_IP, "10.0.0.5": SERVER_IP, "/srv/ecavg": str(lab.home("link") / "srv"),
            "~/ecavg/configs/quickstart.toml": str(config)}


def _scp_function(lab: Lab) -> str:
    """``scp FILES... HOST:`` between the hosts' home directories (the hosts share this machine's disk)."""
    cases = "\n".join(f"    {name}) dir={lab.home(host)} ;;" for name, host in
                      ((SERVER_IP, "link"), ("edge0.example.org", "edge0"), ("edge1.example.org", "edge1")))
    return f"""scp() {{
  local dest="${{@: -1}}" dir
  case "${{dest%%:*}}" in
{cases}
    *) echo "scp: unknown host ${{dest%%:*}}" >&2; return 1 ;;
  esac
  cp "${{@:1:$#-1}}" "$dir/${{dest#*:}}"
}}
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_three_hosts_from_the_docs(lab: Lab) -> None:
    from ecavg.certs import make_node_key_pair
    from ecavg.config import resolve_config
    from ecavg.experiment import run_experiment

    config = lab.root / "quickstart-tiny.toml"
    user = _tiny_quickstart(config)
    substitutions = _substitutions(lab, config)
    docs = DOCS.read_text()
    section = docs[docs.index("## 2. "):docs.index("\n## 3. ")]
    for example in substitutions:
        assert example in section, f"docs/deploy.md section 2 no longer mentions {example}: update this test"

    def prepare(text: str) -> str:
        for example, value in substitutions.items():
            text = text.replace(example, value)
        return text

    prelude = "set -eo pipefail\n" + _scp_function(lab)
    exports = ""  # the docs' `# on: every host` blocks
    blocks = section_two_blocks(docs)
    assert [b.where for b in blocks if "install" not in b.where][:2] == ["every host", "the trusted machine"]
    for block in blocks:
        if block.where.startswith("every host, to install"):
            continue  # the hosts share this checkout's venv (PATH and PYTHONPATH in Lab.env)
        if block.where == "every host":
            exports += block.text
            continue
        hosts = {"the trusted machine": ["trusted"], "the server host": ["link"],
                 "edge host K": ["edge0", "edge1"]}.get(block.where)
        assert hosts is not None, f"docs/deploy.md section 2: unknown host {block.where!r}"
        for host in hosts:
            text = prepare(block.text)
            if host.startswith("edge"):
                text, count = re.subn(r"^K=1\b", f"K={host[-1]}", text, flags=re.M)
                assert count == 1, "the edge block no longer sets K=1: update this test"
            script, started = background_long_running(text, str(lab.home(host) / "logs"))
            lab.run(host, prelude + exports + script, timeout=RUN_TIMEOUT_S)
            if "superlink" in started:
                lab.wait_listening(host, 9093)
            if "gateway" in started:
                lab.wait_listening(host, 9092)

    # The run equals the embedded one bit for bit.
    out = lab.home("link") / "srv" / "runs" / "quickstart"
    results = json.loads((out / "results.json").read_text())
    assert results["runtime"] == "flower" and results["missing_edges"] == {}, results
    embedded = lab.root / "embedded"
    run_experiment(resolve_config(user), output_dir=embedded)
    assert _sha256(out / "server.safetensors") == _sha256(embedded / "server.safetensors")

    # Which node is which edge: the ids the registration gave, the ServerApp's log and `flwr supernode ls` agree.
    node_ids = dict(line.split() for line in (lab.home("link") / "nodes.txt").read_text().splitlines())
    server_log = (out / "logs" / "server.log").read_text()
    for edge, node_id in node_ids.items():
        assert f"{edge} is SuperNode {node_id}" in server_log
    listed = lab.run("link", exports + "flwr supernode ls ecavg --format json")
    registered = {n["node-id"] for n in json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]}
    assert registered == set(node_ids.values())

    # A SuperNode with a key nobody registered, started as the docs start an edge, is refused.
    stranger = lab.home("stranger")
    shutil.copy(lab.home("edge0") / "ca.crt", stranger / "ca.crt")
    make_node_key_pair(stranger / "mine")
    edge_block = next(b.text for b in blocks if b.where == "edge host K")
    supernode = next(line.strip() for line in join_continuations(prepare(edge_block))
                     if line.strip().startswith("flower-supernode"))
    refused = lab.run("stranger", exports + "mkdir -p ~/data; K=0; " + supernode.replace("edge-$K", "mine"),
                      timeout=300, check=False)
    assert refused.returncode != 0
    assert "[code: 2004] Failed to activate SuperNode" in refused.stdout + refused.stderr
    superlink_log = (lab.home("link") / "srv" / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in superlink_log

    # An edge host, holding ca.crt and its key as the docs say, can neither register a node nor submit a run.
    edge0 = lab.home("edge0")
    make_node_key_pair(edge0 / "extra")
    for port in (9092, 9093):
        flwr_home = edge0 / f"flwr-{port}"
        flwr_home.mkdir()
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "link"\n\n[superlink.link]\naddress = "{SERVER_IP}:{port}"\n'
            f'root-certificates = "{edge0 / "ca.crt"}"\n')
        attempt = lab.run("edge0", exports + f"FLWR_HOME={flwr_home} flwr supernode register extra.pub link",
                          check=False)
        expected = "403 Refused: this gateway forwards only the Fleet API" if port == 9092 else \
            "Connection to the SuperLink is unavailable"
        assert attempt.returncode != 0 and expected in " ".join((attempt.stdout + attempt.stderr).split()), \
            attempt.stdout + attempt.stderr
    submit = lab.run("edge0", exports + f"ecavg deploy submit --config {config} --superlink {SERVER_IP}:9092 "
                              "--root-certificates ca.crt --output /tmp/not-here --no-follow", check=False)
    assert submit.returncode != 0 and "403 Refused" in submit.stderr, submit.stdout + submit.stderr
    gateway_log = (lab.home("link") / "logs" / "gateway.out").read_text()
    assert f"refused a request from {ADDRESSES['edge0']}: POST /v1/control/" in gateway_log
    listed = lab.run("link", exports + "flwr supernode ls ecavg --format json")
    assert {n["node-id"] for n in json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]} == registered
    runs = lab.run("link", exports + "flwr ls ecavg --format json")
    assert len(json.loads(runs.stdout[runs.stdout.index("{"):])["runs"]) == 1
