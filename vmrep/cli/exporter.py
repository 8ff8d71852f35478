"""`vmrep exporter`: Prometheus metrics of the state database over HTTP (vmrep/metrics.py).

A quick command: no Prefect run, no vSphere. The config is read once at start (VPGs,
targets); the database is read afresh on every scrape.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from typing import Annotated

import typer

from vmrep.cli import signals
from vmrep.cli.common import ConfigOpt, app, config_from, console_err
from vmrep.errors import VmrepError

DEFAULT_LISTEN = "127.0.0.1:9496"


class ListenError(VmrepError):
    exit_code = 2


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into (host, port); one-line error naming the value."""
    bad = f"--listen {value!r}: give host:port, e.g. {DEFAULT_LISTEN} or [::1]:9496"
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ListenError(bad)
    port = int(port_text)
    if not 0 < port < 65536:
        raise ListenError(f"--listen {value!r}: port {port} is not in 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ListenError(bad) from None
    elif ":" in host or any(c.isspace() for c in host):
        raise ListenError(bad)
    return host, port


@app.command()
def exporter(
    listen: Annotated[str, typer.Option(help="address to serve /metrics on, host:port")] = DEFAULT_LISTEN,
    config: ConfigOpt = None,
) -> None:
    """Serve Prometheus metrics (RPO, status, history, journal, tests, alerts) per VPG."""
    host, port = parse_listen(listen)
    cfg = config_from(config)

    from prometheus_client import start_http_server
    from prometheus_client.registry import CollectorRegistry

    from vmrep.metrics import StateCollector

    logging.basicConfig(level=logging.INFO, format="vmrep exporter: %(message)s")
    journal = None
    try:
        from vmrep.journal import Journal

        journal = Journal.open(cfg.journal_path, block_size=cfg.journal.block_size, create=False)
    except Exception as exc:  # only vmrep_vpg_bytes_stored_total needs it
        logging.getLogger("vmrep.metrics").warning("journal %s not read (%s): no vmrep_vpg_bytes_stored_total",
                                                   cfg.journal_path, exc)
    collector = StateCollector(cfg, journal=journal)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ListenError(f"--listen {listen}: cannot listen there ({exc.strerror or exc})") from None
    console_err.print(f"serving metrics of {collector.safe_url()} on http://{listen}/metrics",
                      markup=False, highlight=False)
    stop = threading.Event()
    # A service manager's SIGTERM and Ctrl-C both end it cleanly: stopping is its normal end.
    signals.stop_ends_successfully()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):  # a timed wait lets the handlers run promptly
            pass
    finally:
        server.shutdown()
        collector.close()
