"""Command line: ``ecavg run``, ``sweep``, ``deploy``, ``plan``, ``certs`` and ``options``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ecavg import __version__


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="experiment TOML file (see configs/)")
    p.add_argument("--data-dir", "-d", help="directory holding <dataset>/ folders (not needed for mnist-sample)")
    p.add_argument("--output", "-o", type=Path, help="output directory (default runs/<name>-<timestamp>)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set edge.epochs=3 --set data.partition=dirichlet (repeatable)")


def _cmd_run(args: argparse.Namespace) -> int:
    from ecavg.config import apply_overrides, load_toml
    from ecavg.experiment import run_experiment
    from ecavg.report import results_table

    if args.resume is not None:
        if args.config is not None or args.overrides or args.runtime != "embedded":
            raise _UsageError("--resume continues an embedded run with the config it started with; "
                              "drop --config/--set/--runtime")
        results = run_experiment(data_dir=args.data_dir, resume=args.resume)
    else:
        if args.config is None:
            raise _UsageError("give --config FILE (e.g. configs/quickstart.toml) or --resume DIR")
        user = apply_overrides(load_toml(args.config), args.overrides)
        user.setdefault("name", args.config.stem)
        if args.output is None:
            # Fixed here so that an interruption can name the directory to resume.
            from ecavg.config import resolve_config
            from ecavg.runtime.setup import default_output_dir

            args.output = default_output_dir(resolve_config(user))
        if args.runtime == "flower-sim":
            from ecavg.deploy import DeployError, deploy_simulation

            try:
                results = deploy_simulation(user, data_dir=args.data_dir, output_dir=args.output)
            except DeployError as e:
                print(f"ecavg: error: {e}", file=sys.stderr)
                return 1
        else:
            results = run_experiment(user, data_dir=args.data_dir, output_dir=args.output)
    print(results_table(results))
    written = "results.json, results.md, accuracy.png, metrics.jsonl"
    if not args.no_report and write_report_or_warn(Path(results["output_dir"])):
        written += ", report.html"
    print(f"Results written to {results['output_dir']}/ ({written})")
    return 0


def write_report_or_warn(directory: Path) -> bool:
    """report.html at the end of a run or sweep; a failure here warns but keeps the finished run's exit code 0."""
    from ecavg.html_report import write_report

    try:
        write_report(directory)
    except Exception as e:  # the results are already on disk: losing them to a report bug would be worse
        print(f"ecavg: warning: report.html not written ({type(e).__name__}: {e}); "
              f"try `ecavg report {directory}`", file=sys.stderr)
        return False
    return True


def _cmd_report(args: argparse.Namespace) -> int:
    import webbrowser

    from ecavg.html_report import plotly_available, write_report

    path = write_report(args.directory)
    note = "" if plotly_available() else " (static: plotly is not installed)"
    print(f"Report written to {path}{note}")
    if args.open:
        webbrowser.open(path.resolve().as_uri())
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from ecavg.config import apply_overrides, load_toml
    from ecavg.deploy import DeployError, deploy_local, deploy_simulation, deploy_submit
    from ecavg.report import results_table

    if args.config is None:
        raise _UsageError("give --config FILE (e.g. configs/quickstart.toml)")
    if args.where == "submit" and args.output is None:
        raise _UsageError("give --output DIR: the output directory on the SuperLink's host")
    user = apply_overrides(load_toml(args.config), args.overrides)
    user.setdefault("name", args.config.stem)
    try:
        if args.where == "local":
            results = deploy_local(user, edges=args.edges, data_dir=args.data_dir, output_dir=args.output,
                                   tls=args.tls, node_auth=args.auth, timeout_s=args.timeout,
                                   warm_clientapps=args.warm_clientapps, links=args.link, edge_cpu=args.edge_cpu)
        elif args.where == "sim":
            results = deploy_simulation(user, edges=args.edges, data_dir=args.data_dir, output_dir=args.output,
                                        cpus_per_edge=args.cpus_per_edge, timeout_s=args.timeout)
        else:
            results = deploy_submit(user, superlink=args.superlink, output_dir=str(args.output),
                                    data_dir=args.data_dir, root_certificates=args.root_certificates,
                                    insecure=args.insecure, timeout_s=args.timeout, follow=not args.no_follow,
                                    pending_timeout_s=args.pending_timeout)
    except DeployError as e:
        print(f"ecavg: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\necavg: interrupted; every process this command started has been stopped", file=sys.stderr)
        return 130
    if isinstance(results, int):
        print(f"Submitted run {results}; follow it with `flwr log {results} <connection>`")
        return 0
    if "edges" in results:
        print(results_table(results))
    print(f"Results written to {results['output_dir']}/ (results.json, results.md, metrics.jsonl, logs/)")
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    from ecavg.deploy.gateway import make_gateway, run_gateway
    from ecavg.errors import DeployError

    try:
        run_gateway(make_gateway(args.listen, args.superlink, certfile=args.ssl_certfile, keyfile=args.ssl_keyfile,
                                 root_certificates=args.root_certificates))
    except DeployError as e:
        print(f"ecavg: error: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from ecavg.doctor import print_report, run_checks

    report = run_checks(args.role, superlink=args.superlink, root_certificates=args.root_certificates,
                        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, auth_key=args.auth_key,
                        data_dir=args.data_dir, config=args.config)
    return print_report(report)


def _cmd_certs(args: argparse.Namespace) -> int:
    from ecavg.certs import LOOPBACK_HOSTS, CertificateError, make_credentials, server_hosts

    try:
        creds = make_credentials(args.out, hosts=args.hosts, num_nodes=args.nodes, days=args.days,
                                 overwrite=args.force)
    except CertificateError as e:
        print(f"ecavg: error: {e}", file=sys.stderr)
        return 2
    print(f"CA:                {creds.ca_cert} (give to every SuperNode; keep {creds.ca_key.name} offline)")
    given = [h for h in server_hosts(args.hosts) if h not in LOOPBACK_HOSTS]
    print(f"SuperLink TLS:     {creds.server_cert}, {creds.server_key} (valid for {', '.join(given)} and, always, "
          f"{', '.join(LOOPBACK_HOSTS)}: Flower's SuperExec and operators on the server host connect there)")
    for private, public in creds.node_keys:
        print(f"SuperNode key:     {private} (stays on the edge host), {public} (register with the SuperLink)")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ecavg.config import apply_overrides, load_toml
    from ecavg.sweep import parse_grid, run_sweep

    if args.config is None:
        raise _UsageError("give --config FILE")
    user = apply_overrides(load_toml(args.config), args.overrides)
    user.setdefault("name", args.config.stem)
    out = args.output or Path("runs") / f"sweep-{args.config.stem}"
    run_sweep(user, parse_grid(args.grid), output_dir=out, data_dir=args.data_dir)
    print((out / "sweep.md").read_text())
    written = "sweep.md, sweep.csv, sweep.png"
    if not args.no_report and write_report_or_warn(out):
        written += ", report.html"
    print(f"Sweep written to {out}/ ({written}, one folder per run)")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from ecavg.config import apply_overrides, load_toml, resolve_config
    from ecavg.deploy.rates import parse_cpu_share, parse_edge_values, parse_rate
    from ecavg.plan import make_plan, plan_table
    from ecavg.plan.inputs import run_config

    if args.config is None and not args.from_runs:
        raise _UsageError("give --config FILE (and/or --from RUN_DIR, whose config is used otherwise)")
    user = load_toml(args.config) if args.config is not None else run_config(args.from_runs[0])
    cfg = resolve_config(apply_overrides(user, args.overrides))
    edges = cfg["data"]["num_edges"]
    plan = make_plan(cfg, data_dir=args.data_dir, from_runs=args.from_runs, message_overhead_s=args.message_overhead,
                     links=parse_edge_values(args.links, flag="--link", num_edges=edges, parse=parse_rate),
                     cpu_shares=parse_edge_values(args.edge_cpu, flag="--edge-cpu", num_edges=edges,
                                                  parse=parse_cpu_share), warm_clientapps=args.warm_clientapps)
    print(json.dumps(plan, indent=2) if args.json else plan_table(plan))
    return 0


def _cmd_options(args: argparse.Namespace) -> int:
    """Every choice made through a registry, its options and the config keys they add."""
    from ecavg.config import schema
    from ecavg.core.options import REGISTRIES

    defaults = schema()[0]
    for registry in REGISTRIES:
        print(f"{registry.selector} (default {registry.default!r}):")
        width = max(len(option.name) for option in registry)  # names line up within each registry
        for option in registry:
            print(f"  {option.name:<{width}} {option.summary}")
            for dotted, key in getattr(option, "keys", {}).items():
                node = defaults
                for part in dotted.split("."):
                    node = node[part]
                print(f"  {'':<{width}}   {dotted} = {node!r}{'  ' + key.doc if key.doc else ''}")
        print()
    return 0


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecavg",
                                     description="Edge-cloud collaborative learning with averaged weights.")
    parser.add_argument("--version", action="version", version=f"ecavg {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one experiment in this process (all edges simulated)",
                         epilog="`ecavg options` lists every strategy and option with its config keys.")
    _add_run_arguments(run)
    run.add_argument("--resume", type=Path, metavar="DIR", help="continue an interrupted run in DIR")
    run.add_argument("--runtime", choices=("embedded", "flower-sim"), default="embedded",
                     help="embedded: all edges in this process (default); flower-sim: Flower's Ray simulation "
                          "runtime, the deployment's code path (same as `ecavg deploy sim`; needs flwr[simulation])")
    run.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    run.set_defaults(func=_cmd_run)

    sweep = sub.add_parser("sweep", help="run a grid of experiments and tabulate them (re-run to continue)")
    _add_run_arguments(sweep)
    sweep.add_argument("--grid", "-g", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="a config key and its values, e.g. --grid data.alpha=100,1,0.1 (repeatable: the "
                            "cartesian product runs); --grid seed=0,1,2 gives mean and spread over seeds")
    sweep.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    sweep.set_defaults(func=_cmd_sweep)

    report = sub.add_parser("report", help="write report.html (charts, tables, config) into a run or sweep "
                                           "directory")
    report.add_argument("directory", type=Path, metavar="RUN_OR_SWEEP_DIR")
    report.add_argument("--open", action="store_true", help="open it in the default web browser")
    report.set_defaults(func=_cmd_report)

    deploy = sub.add_parser("deploy", help="run one experiment on a Flower federation (see docs/deploy.md)")
    deploy_sub = deploy.add_subparsers(dest="where", required=True)
    local = deploy_sub.add_parser("local", help="start a SuperLink and N SuperNodes on 127.0.0.1 and run there")
    _add_run_arguments(local)
    local.add_argument("--edges", "-n", type=int, help="number of SuperNodes (edges); default data.num_edges")
    local.add_argument("--tls", action="store_true", help="TLS on every connection (throw-away CA in the output)")
    local.add_argument("--auth", action="store_true", help="SuperNode authentication (needs --tls)")
    local.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long")
    local.add_argument("--warm-clientapps", action=argparse.BooleanOptionalAction, default=False,
                       help="one long-lived ClientApp process per SuperNode (imports PyTorch and loads the edge's "
                            "data once) instead of Flower's fresh process per message")
    local.add_argument("--link", action="append", default=[], metavar="NAME=RATE",
                       help="emulated link: NAME edge-K or all, RATE as tc writes it (10mbit, 500kbit); puts every "
                            "SuperNode in a network namespace, tc tbf both ways; no latency emulated (needs root)")
    local.add_argument("--edge-cpu", action="append", default=[], metavar="NAME=SHARE",
                       help="CPU share of an edge (edge-K or all): a fraction of one core, e.g. edge-1=0.25, "
                            "enforced with a cgroup CPU quota (needs root)")
    local.set_defaults(func=_cmd_deploy)
    sim = deploy_sub.add_parser("sim", help="Flower's simulation runtime (Ray): many edges on this machine")
    _add_run_arguments(sim)
    sim.add_argument("--edges", "-n", type=int, help="number of simulated edges; default data.num_edges")
    sim.add_argument("--cpus-per-edge", type=int, default=1, help="Ray CPUs per edge (edges trained at once: "
                                                                  "cores / this)")
    sim.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long")
    sim.set_defaults(func=_cmd_deploy)
    submit = deploy_sub.add_parser("submit", help="submit to a running SuperLink (multi-host deployment)")
    _add_run_arguments(submit)
    submit.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    submit.add_argument("--root-certificates", metavar="CA.crt", help="CA certificate that signed the SuperLink's")
    submit.add_argument("--insecure", action="store_true", help="no TLS (trusted networks only)")
    submit.add_argument("--no-follow", action="store_true", help="return after submitting")
    submit.add_argument("--timeout", type=float, metavar="SECONDS", help="stop following after this long")
    submit.add_argument("--pending-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="a run the SuperLink has not started after this long is stopped, with the reason "
                             "(default 120; 0: do not wait)")
    submit.set_defaults(func=_cmd_deploy)
    gateway = deploy_sub.add_parser(
        "gateway", help="on the server host: forward only the Fleet API (SuperNodes) to a SuperLink that listens on "
                        "127.0.0.1, so edges cannot register nodes or submit runs (see docs/deploy.md)")
    gateway.add_argument("--listen", required=True, metavar="HOST:PORT",
                         help="where the edges connect, e.g. 0.0.0.0:9092")
    gateway.add_argument("--superlink", default="127.0.0.1:9093", metavar="HOST:PORT",
                         help="the SuperLink (default 127.0.0.1:9093)")
    gateway.add_argument("--ssl-certfile", required=True, help="the SuperLink's certificate (server.crt)")
    gateway.add_argument("--ssl-keyfile", required=True, help="its key (server.key)")
    gateway.add_argument("--root-certificates", required=True, metavar="CA.crt",
                         help="the CA that signed it, to verify the SuperLink")
    gateway.set_defaults(func=_cmd_gateway)

    plan = sub.add_parser("plan", help="predict the wall time of each phase of a Flower deployment from the "
                                       "compute, the bytes per transfer, the edges' links and CPU shares")
    plan.add_argument("--config", "-c", type=Path, help="experiment TOML file (default with --from: that run's)")
    plan.add_argument("--data-dir", "-d", help="directory holding <dataset>/ folders (not needed for mnist-sample)")
    plan.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key (repeatable)")
    plan.add_argument("--link", dest="links", action="append", default=[], metavar="NAME=RATE",
                      help="an edge's link rate, both ways: edge-K=10mbit, or all=1mbit (repeatable; default: "
                           "unlimited)")
    plan.add_argument("--edge-cpu", action="append", default=[], metavar="NAME=SHARE",
                      help="an edge's share of one CPU core, e.g. edge-1=0.25 (needs threads = 1; repeatable)")
    source = plan.add_mutually_exclusive_group()
    source.add_argument("--calibrate", action="store_true", help="measure compute here: a few training batches "
                                                                 "of the model (the default)")
    source.add_argument("--from", dest="from_runs", type=Path, metavar="RUN_DIR", action="append", default=[],
                        help="take compute rates from an earlier run of the same model and dataset (and, from a "
                             "deployed run, Flower's overhead); repeatable: the median over the runs")
    plan.add_argument("--message-overhead", type=float, metavar="SECONDS",
                      help="seconds per message exchange, replacing Flower's routing + the edge process start "
                           "(default: routing measured on the development machine + the start timed here)")
    plan.add_argument("--warm-clientapps", action="store_true",
                      help="plan a deployment with one long-lived ClientApp per SuperNode (as deploy local "
                           "--warm-clientapps): it also waits for Flower to notice each download's last byte")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_cmd_plan)

    options = sub.add_parser("options", help="list the strategies, aggregation rules, server objectives, ... and "
                                                 "the config keys each adds")
    options.set_defaults(func=_cmd_options)

    doctor = sub.add_parser("doctor", help="pre-flight checks on one host of a Flower deployment: executables, "
                                           "certificates, keys, the SuperLink's address, the data (docs/deploy.md)")
    doctor.add_argument("--role", choices=("superlink", "supernode", "operator"), required=True,
                        help="what this host runs: the SuperLink, a SuperNode (an edge), or flwr/ecavg deploy submit")
    doctor.add_argument("--superlink", metavar="HOST:PORT", help="the address this host uses for the SuperLink "
                                                                 "(an edge: the gateway's)")
    doctor.add_argument("--root-certificates", metavar="CA.crt", help="the CA certificate (ca.crt)")
    doctor.add_argument("--ssl-certfile", help="the SuperLink's certificate (server.crt), on the server host")
    doctor.add_argument("--ssl-keyfile", help="the SuperLink's key (server.key), on the server host")
    doctor.add_argument("--auth-key", metavar="KEY", help="this SuperNode's private key (edge-K)")
    doctor.add_argument("--data-dir", "-d", help="the directory holding <dataset>/ folders (an edge: its data-dir)")
    doctor.add_argument("--config", "-c", type=Path, help="the experiment config, to check that its dataset loads")
    doctor.set_defaults(func=_cmd_doctor)

    certs = sub.add_parser("certs", help="make a CA, a SuperLink TLS certificate and SuperNode key pairs")
    certs.add_argument("--out", "-o", type=Path, required=True, help="directory for the files")
    certs.add_argument("--host", dest="hosts", action="append", required=True, metavar="NAME_OR_IP",
                       help="a name or IP address the SuperNodes use to reach the SuperLink (repeatable)")
    certs.add_argument("--nodes", type=int, default=0, help="number of SuperNode key pairs (edge-0, edge-1, ...)")
    certs.add_argument("--days", type=int, default=365, help="validity in days")
    certs.add_argument("--force", action="store_true", help="overwrite existing files")
    certs.set_defaults(func=_cmd_certs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    from ecavg.errors import USER_ERRORS

    try:
        return args.func(args)
    except _UsageError as e:
        parser.error(str(e))
    except USER_ERRORS as e:
        print(f"ecavg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = getattr(args, "resume", None) or getattr(args, "output", None) or "<output directory>"
        print(f"\necavg: interrupted; finished phases are kept, continue with `ecavg run --resume {where}`",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
