"""Flower's command-line tools: their offline environment, the ``flwr`` CLI and what it prints.

Offline: every Flower process runs with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (no ``uv sync`` of
the app's dependencies: the app is this installed package), ``FLWR_TELEMETRY_ENABLED=0`` and
``FLWR_DISABLE_UPDATE_CHECK=1``, and a private ``FLWR_HOME`` holding one SuperLink connection named ``ecavg``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ecavg
from ecavg.errors import DeployError

log = logging.getLogger("ecavg")

CONNECTION = "ecavg"  # the name of the SuperLink connection in the private FLWR_HOME

# How long one `flwr` command may take: it starts a Python process that imports Flower, which on a loaded machine
# has taken over a minute.
CLI_TIMEOUT_S = 300.0
# Runs one ``flwr`` command: (arguments, timeout=seconds) -> the finished process with its text output.
RunCli = Callable[..., subprocess.CompletedProcess]


def offline_env(flwr_home: Path) -> dict[str, str]:
    """The environment for every Flower process: offline, private FLWR_HOME, this ecavg importable."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    })
    # The ServerApp and ClientApps are loaded by name (ecavg.runtime.flower) in processes Flower starts:
    # they must import this same ecavg, also when it runs from a source checkout.
    package_root = str(Path(ecavg.__file__).resolve().parent.parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([package_root, *[p for p in paths if p != package_root]])
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    return env


def flower_command(name: str) -> list[str]:
    """A Flower console script (flwr, flower-superlink, flower-supernode) of this Python environment."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which(name)
    if found:
        return [found]
    raise DeployError(f"{name} not found next to {sys.executable} nor on PATH; install Flower: "
                      "pip install 'ecavg[flower]'")


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (a JSON string literal is one: same escapes, \\uXXXX for the rest)."""
    return json.dumps(value)


def write_connection(flwr_home: Path, address: str, *, root_certificates: Path | None) -> None:
    """The private Flower config: one SuperLink connection named ``ecavg``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f"address = {toml_string(address)}"]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {toml_string(str(Path(root_certificates).resolve()))}")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def cli_runner(env: Mapping[str, str], cwd: Path) -> RunCli:
    """A :data:`RunCli` that runs this environment's ``flwr`` with ``env`` in ``cwd``."""

    def run_cli(args: list[str], *, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([*flower_command("flwr"), *args], env=dict(env), capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, check=False)

    return run_cli


def json_from_output(text: str) -> dict[str, Any]:
    """The JSON object that ``flwr ... --format json`` prints (after any log lines)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in the output")
    return json.loads(text[start:])


def submit_run(run_cli: RunCli, app_dir: Path, *, federation_config: Mapping[str, Any] | None = None) -> int:
    """``flwr run`` the app in ``app_dir``; returns the run id."""
    args = ["run", str(app_dir), CONNECTION, "--format", "json"]
    if federation_config:
        args += ["--federation-config", " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config.items())]
    result = run_cli(args, timeout=CLI_TIMEOUT_S)
    try:
        reply = json_from_output(result.stdout)
    except ValueError:
        reply = {}
    if result.returncode != 0 or not reply.get("success"):
        raise DeployError(f"`flwr run` failed: {(result.stdout + result.stderr).strip()[-3000:]}")
    return int(reply["run-id"])


def list_runs(run_cli: RunCli) -> list[dict[str, Any]]:
    """Every run the SuperLink knows, as ``flwr ls --format json`` reports them (run-id, status, status-details,
    pending-at, ...); empty when the CLI gave no answer."""
    result = run_cli(["ls", CONNECTION, "--format", "json"], timeout=CLI_TIMEOUT_S)
    try:
        return list(json_from_output(result.stdout).get("runs", []))
    except ValueError:
        return []


def stop_run(run_cli: RunCli, run_id: int) -> bool:
    """``flwr stop``; True when Flower confirmed it."""
    result = run_cli(["stop", str(run_id), CONNECTION, "--format", "json"], timeout=CLI_TIMEOUT_S)
    try:
        return bool(json_from_output(result.stdout).get("success"))
    except ValueError:
        return False


def run_status(run_cli: RunCli, run_id: int) -> str:
    """The run's status as ``flwr ls`` reports it (e.g. ``running``, ``finished:completed``), or ``unknown``
    (also when the command is slower than its timeout: a status poll must not stop a run that is fine)."""
    try:
        result = run_cli(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], timeout=CLI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "unknown"
    try:
        runs = json_from_output(result.stdout).get("runs", [])
    except ValueError:
        return "unknown"
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def register_node(run_cli: RunCli, public_key: Path) -> None:
    """Register a SuperNode's public key with the SuperLink (needed when node authentication is on)."""
    result = run_cli(["supernode", "register", str(public_key), CONNECTION, "--format", "json"], timeout=CLI_TIMEOUT_S)
    if result.returncode != 0:
        raise DeployError(f"registering {public_key} with the SuperLink failed: "
                          f"{(result.stdout + result.stderr).strip()[-2000:]}")


def save_run_log(run_cli: RunCli, run_id: int, path: Path) -> None:
    """The ServerApp's log as the SuperLink kept it (what `flwr log` shows)."""
    try:
        result = run_cli(["log", str(run_id), CONNECTION, "--show"], timeout=CLI_TIMEOUT_S)
        path.write_text(result.stdout + result.stderr)
    except (subprocess.TimeoutExpired, OSError) as error:
        log.warning("could not save the ServerApp log to %s: %s", path, error)


def unregister_node(run_cli: RunCli, node_id: int, *, address: str, root_certificates: Path | None) -> bool:
    """Unregister SuperNode ``node_id`` (what ``flwr supernode unregister`` does): the SuperLink stops listing it at
    once and answers the messages waiting for it with "Node Unavailable". True when the SuperLink confirmed it.

    The Control API is called from this process (milliseconds: the ``flwr`` CLI takes seconds to start on a loaded
    machine); if that fails (a Flower whose client classes moved), the CLI is run instead."""
    try:
        from flwr.proto.control_pb2 import UnregisterNodeRequest  # pylint: disable=E0611
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        client = ControlHttpClient.from_server_address(
            server_address=address, insecure=root_certificates is None,
            root_certificates=str(root_certificates) if root_certificates is not None else None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
        try:
            client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
            return True
        finally:
            client.close()
    except Exception as error:  # noqa: BLE001 - the CLI below is the documented way; it reports its own errors
        log.debug("unregistering node %d through the Control API failed (%s); trying the flwr CLI", node_id, error)
    result = run_cli(["supernode", "unregister", str(node_id), CONNECTION, "--format", "json"], timeout=CLI_TIMEOUT_S)
    return result.returncode == 0
