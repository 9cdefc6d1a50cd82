"""``ecavg doctor``: pre-flight checks on one host of a Flower deployment, one line per finding.

Each failure of a multi-host deployment that Flower reports late, far away or not at all is checked here, on the
host where it can be fixed: the Flower executables on PATH (the SuperLink starts ``flower-superexec`` by name and
dies if it is missing), the certificates (subject alternative names, expiry, the CA that signed them, loopback for
the SuperLink's own helper), the key files, which of the SuperLink's APIs answer at the address this host uses (an
edge must reach the Fleet API and must not reach the Control API), and an edge's data.

Every problem is one line naming what to do; :func:`run_checks` returns the findings, and the command exits
non-zero when any is a problem.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("superlink", "supernode", "operator")
# What each role runs, and what Flower starts by name under it (the SuperExec, then one process per app or message).
EXECUTABLES = {
    "superlink": ("flower-superlink", "flower-superexec", "flwr-serverapp", "flwr"),
    "supernode": ("flower-supernode", "flower-superexec", "flwr-clientapp"),
    "operator": ("flwr",),
}
LOOPBACK = "127.0.0.1"
EXPIRY_WARNING_DAYS = 30
CONNECT_TIMEOUT_S = 5.0
# The reason phrase of the gateway's refusals (ecavg.deploy.gateway.REFUSAL_PHRASE), without importing asyncio.
GATEWAY_MARK = "forwards only the Fleet API"


@dataclass
class Finding:
    ok: bool
    text: str

    def line(self) -> str:
        return f"{'ok     ' if self.ok else 'PROBLEM'}  {self.text}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def ok(self, text: str) -> None:
        self.findings.append(Finding(True, text))

    def problem(self, text: str) -> None:
        self.findings.append(Finding(False, text))

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]


# ---------------------------------------------------------------------------------------------------
# Executables
# ---------------------------------------------------------------------------------------------------


def check_executables(report: Report, role: str) -> None:
    here = Path(sys.executable).parent
    for name in EXECUTABLES[role]:
        found = shutil.which(name)
        if found is None:
            beside = here / name
            hint = (f"it is in {here}: put that directory on PATH (e.g. `export PATH={here}:$PATH` or activate the "
                    "venv) in the shell or service that starts Flower") if beside.exists() else \
                "install Flower into ecavg's environment (pip install -e '.[flower]' in the checkout) and put its " \
                "bin/ on PATH"
            started_by_flower = name not in ("flower-superlink", "flower-supernode", "flwr")
            why = "; Flower starts it by name, so the deployment fails" if started_by_flower else ""
            report.problem(f"{name} is not on PATH{why}: {hint}")
            continue
        report.ok(f"{name}: {found}")
    if role in ("superlink", "supernode"):
        app = "flwr-serverapp" if role == "superlink" else "flwr-clientapp"
        check_app_python(report, app)


def check_app_python(report: Report, app: str) -> None:
    """The Python that runs Flower's app processes (the shebang of ``app``) must import this ecavg's package."""
    found = shutil.which(app)
    if found is None:
        return
    try:
        first = Path(found).read_bytes()[:512].split(b"\n", 1)[0].decode()
    except (OSError, UnicodeDecodeError):
        return
    if not first.startswith("#!"):
        return
    interpreter = first[2:].strip().split()
    check = "import importlib.util, sys; sys.exit(importlib.util.find_spec('ecavg') is None)"
    try:
        result = subprocess.run([*interpreter, "-c", check], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        report.problem(f"{app}'s Python ({' '.join(interpreter)}) cannot be run ({e}): reinstall Flower")
        return
    if result.returncode != 0:
        report.problem(f"{app} runs {' '.join(interpreter)}, which cannot import ecavg: install ecavg into that "
                       "environment (pip install -e . in the checkout) or set PYTHONPATH to the checkout")
    else:
        report.ok(f"{app} runs a Python that imports ecavg")


# ---------------------------------------------------------------------------------------------------
# Certificates and keys
# ---------------------------------------------------------------------------------------------------


def _read(report: Report, path: str | Path, what: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        report.problem(f"{what} {path} cannot be read ({e.strerror or e}): copy it to this host and give its path")
        return None


def _load_certificate(report: Report, path: str | Path, what: str) -> Any:
    from cryptography import x509

    data = _read(report, path, what)
    if data is None:
        return None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        report.problem(f"{what} {path} is not a PEM certificate: give the .crt file made by `ecavg certs`")
        return None


def _validity(report: Report, cert: Any, path: str | Path, what: str, fix: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    if now < cert.not_valid_before_utc:
        report.problem(f"{what} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this "
                       "host's clock")
    elif now > cert.not_valid_after_utc:
        report.problem(f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}: {fix}")
    elif cert.not_valid_after_utc - now < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        report.problem(f"{what} {path} expires on {cert.not_valid_after_utc:%Y-%m-%d}, in less than "
                       f"{EXPIRY_WARNING_DAYS} days: {fix}")
    else:
        report.ok(f"{what} {path} valid until {cert.not_valid_after_utc:%Y-%m-%d}")


def certificate_names(cert: Any) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for (its subject alternative names)."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(a) for a in san.get_values_for_type(x509.IPAddress))]


def covers(names: list[str], host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.lower() in (n.lower() for n in names)
    return any(_same_address(n, address) for n in names)


def _same_address(name: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(name) == address
    except ValueError:
        return False


def check_ca(report: Report, path: str | Path) -> Any:
    from cryptography import x509

    ca = _load_certificate(report, path, "CA certificate")
    if ca is None:
        return None
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        report.problem(f"{path} is not a CA certificate: --root-certificates takes ca.crt, not server.crt")
        return None
    _validity(report, ca, path, "CA certificate", "make new credentials with `ecavg certs` and redistribute ca.crt")
    return ca


def check_server_certificate(report: Report, certfile: str | Path, keyfile: str | Path | None, ca: Any,
                             superlink_host: str | None) -> None:
    from cryptography.hazmat.primitives import serialization

    cert = _load_certificate(report, certfile, "SuperLink certificate")
    if cert is None:
        return
    fix = "make new credentials with `ecavg certs --host <the name edges use>` and restart the SuperLink"
    _validity(report, cert, certfile, "SuperLink certificate", fix)
    if ca is not None:
        try:
            cert.verify_directly_issued_by(ca)
            report.ok(f"{certfile} is signed by the given CA")
        except Exception:  # cryptography raises ValueError, TypeError or InvalidSignature
            report.problem(f"{certfile} is not signed by the given CA: use the server.crt and ca.crt made together by "
                           "one `ecavg certs`")
    names = certificate_names(cert)
    if not covers(names, LOOPBACK):
        report.problem(f"{certfile} does not cover {LOOPBACK} (it covers {', '.join(names) or 'nothing'}): the "
                       "SuperLink's SuperExec connects to 127.0.0.1 and fails TLS verification, so every run stays "
                       f"pending; {fix}")
    else:
        report.ok(f"{certfile} covers {', '.join(names)}")
    if superlink_host and not covers(names, superlink_host):
        report.problem(f"{certfile} does not cover {superlink_host}, the address given in --superlink: {fix}")
    if keyfile is None:
        return
    data = _read(report, keyfile, "SuperLink key")
    if data is None:
        return
    _private_mode(report, keyfile)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        report.problem(f"{keyfile} is not an unencrypted PEM private key: give server.key made by `ecavg certs`")
        return
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        report.problem(f"{keyfile} is not the key of {certfile}: give the pair made together by `ecavg certs`")
    else:
        report.ok(f"{keyfile} is the key of {certfile}")


def _private_mode(report: Report, path: str | Path) -> None:
    mode = Path(path).stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        report.problem(f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}): chmod 600 {path}")


def check_node_key(report: Report, path: str | Path) -> None:
    """A SuperNode's private key: readable, private, an EC key in OpenSSH format, matching its .pub."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read(report, path, "SuperNode key")
    if data is None:
        return
    _private_mode(report, path)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Flower reads OpenSSH keys only; a PEM key here is usually ca.key or server.key given by mistake.
        report.problem(f"{path} is not an unencrypted OpenSSH private key, which is what flower-supernode "
                       "--auth-supernode-private-key reads: give nodes/edge-K made by `ecavg certs --nodes N`")
        return
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        report.problem(f"{path} is a {type(key).__name__}, but Flower's SuperNode authentication needs an EC key: "
                       "make one with `ecavg certs --nodes N`")
        return
    public = Path(f"{path}.pub")
    if public.exists():
        mine = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        if public.read_bytes().split()[:2] != mine.split()[:2]:
            report.problem(f"{public} is not the public key of {path}: register the .pub made with it")
            return
    report.ok(f"{path}: EC private key ({key.curve.name}); its .pub is what the operator registers")


# ---------------------------------------------------------------------------------------------------
# Reaching the SuperLink
# ---------------------------------------------------------------------------------------------------


def split_host_port(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        return None
    return host, int(port)


def probe_health(host: str, port: int, ca_path: str | Path | None) -> tuple[int, str]:
    """(HTTP status, reason phrase) of ``GET /health`` over TLS verified with the CA (or plain HTTP without one).

    The SuperLink answers 200 (it serves every API on that port); ecavg's gateway answers 403 with its mark."""
    conn = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    try:
        if ca_path is not None:
            context = ssl.create_default_context(cafile=str(ca_path))
            conn = context.wrap_socket(conn, server_hostname=host)
        conn.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        status_line = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
    finally:
        conn.close()
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"no HTTP answer ({status_line[:60]!r})")
    return int(parts[1]), parts[2] if len(parts) > 2 else ""


def peer_certificate(host: str, port: int, ca_path: str | Path) -> Any:
    """The certificate the SuperLink at host:port presents (verified against the CA: chain and host name)."""
    from cryptography import x509

    context = ssl.create_default_context(cafile=str(ca_path))
    with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as raw:
        with context.wrap_socket(raw, server_hostname=host) as conn:
            der = conn.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def check_superlink_address(report: Report, role: str, address: str, ca_path: str | Path | None) -> None:
    parsed = split_host_port(address)
    if parsed is None:
        report.problem(f"--superlink {address!r} is not HOST:PORT")
        return
    host, port = parsed
    try:
        status, reason = probe_health(host, port, ca_path)
    except ssl.SSLCertVerificationError as e:
        report.problem(f"{address}: TLS verification failed ({e.verify_message}): the SuperLink's certificate must be "
                       f"signed by the CA given and cover {host} (ecavg certs --host {host})")
        return
    except ssl.SSLError as e:
        report.problem(f"{address}: TLS handshake failed ({e.reason}); is it started with --ssl-certfile (or is "
                       "this a plain-HTTP --insecure SuperLink)?")
        return
    except OSError as e:
        why = "nothing listens there" if isinstance(e, ConnectionRefusedError) else (e.strerror or str(e))
        if role == "superlink":
            report.ok(f"{address}: {why} (start the SuperLink; then run this check again)")
        else:
            report.problem(f"{address} cannot be reached from this host ({why}): check the address, that the "
                           "SuperLink (or its gateway) runs, and the firewall between the hosts")
        return
    gateway = status == 403 and GATEWAY_MARK in reason
    superlink = status == 200
    if role == "supernode":
        if gateway:
            report.ok(f"{address}: ecavg's Fleet gateway (TLS verified); the Control API is not reachable here")
        elif superlink:
            report.problem(f"{address} is the SuperLink itself, whose port also serves the Control API: anyone on "
                           "this host can register SuperNodes and submit runs. Start the SuperLink with --host "
                           "127.0.0.1 and give the edges the address of `ecavg deploy gateway` (docs/deploy.md 2.2)")
        else:
            report.problem(f"{address} answered HTTP {status} {reason}: neither a SuperLink nor ecavg's gateway")
    elif superlink:
        report.ok(f"{address}: the SuperLink answers (TLS verified)" if ca_path else
                  f"{address}: the SuperLink answers (no TLS)")
    elif gateway:
        report.problem(f"{address} is the Fleet gateway, which refuses `flwr` and `ecavg deploy submit`: use the "
                       "SuperLink's own port, on the server host (127.0.0.1:9093) or through an SSH tunnel")
    else:
        report.problem(f"{address} answered HTTP {status} {reason}: not a SuperLink")


# ---------------------------------------------------------------------------------------------------
# Data and config
# ---------------------------------------------------------------------------------------------------


def check_data(report: Report, config: str | Path | None, data_dir: str | None, role: str) -> None:
    from ecavg.config import load_toml, resolve_config
    from ecavg.data import load_dataset
    from ecavg.errors import EcavgError

    if data_dir is not None and not Path(data_dir).is_dir():
        report.problem(f"the data dir {data_dir} does not exist on this host: create it and put the dataset's folder "
                       "in it (on an edge it is the node config's data-dir)")
        return
    if config is None:
        report.ok(f"data dir {data_dir or '(none)'}; give --config (the experiment) to check that its dataset loads")
        return
    try:
        cfg = resolve_config(load_toml(Path(config)))
    except EcavgError as e:
        report.problem(f"the config {config}: {e}")
        return
    dataset = cfg["data"]["dataset"]
    try:
        splits = load_dataset(dataset, data_dir, download=False)
    except EcavgError as e:
        where = "the node config's data-dir (flower-supernode --node-config 'partition-id=K data-dir=\"DIR\"')" \
            if role == "supernode" else "--data-dir"
        report.problem(f"{dataset} cannot be loaded from {data_dir or 'the default data dir'} ({e}); point {where} "
                       "at the directory holding it")
        return
    report.ok(f"{dataset} loads from {data_dir or 'the default data dir'}: {len(splits.train)} training / "
              f"{len(splits.test)} test samples, {len(splits.train.classes)} classes")


# ---------------------------------------------------------------------------------------------------


def run_checks(role: str, *, superlink: str | None = None, root_certificates: str | None = None,
               ssl_certfile: str | None = None, ssl_keyfile: str | None = None, auth_key: str | None = None,
               data_dir: str | None = None, config: str | None = None) -> Report:
    """Every check that applies to ``role`` with the files given; see the module docstring."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    report = Report()
    check_executables(report, role)
    ca = check_ca(report, root_certificates) if root_certificates else None
    if role == "superlink":
        if ssl_certfile:
            parsed = split_host_port(superlink) if superlink else None
            check_server_certificate(report, ssl_certfile, ssl_keyfile, ca, parsed[0] if parsed else None)
        else:
            report.problem("no --ssl-certfile given: give the SuperLink's certificate (server.crt) to check it")
    elif root_certificates is None:
        report.problem("no --root-certificates given: this host needs ca.crt to verify the SuperLink")
    if auth_key:
        check_node_key(report, auth_key)
    elif role == "supernode":
        report.problem("no --auth-key given: an edge needs its private key (edge-K) when the SuperLink authenticates "
                       "SuperNodes")
    if superlink:
        check_superlink_address(report, role, superlink, root_certificates if ca is not None else None)
    if role == "supernode" or data_dir is not None or config is not None:
        check_data(report, config, data_dir, role)
    return report


def print_report(report: Report, write: Callable[[str], None] = print) -> int:
    for finding in report.findings:
        write(finding.line())
    problems = len(report.problems)
    write(f"{problems} problem{'s' if problems != 1 else ''}" if problems else "no problems found")
    return 1 if problems else 0

