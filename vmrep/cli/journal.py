"""Journal commands: `vmrep journal repair-index`, `vmrep journal serve`, `vmrep journal retention`."""

from __future__ import annotations

from typing import Annotated

import typer

from vmrep.cli.common import ConfigOpt, JsonOpt, app, config_from, console, console_err, print_json
from vmrep.errors import VmrepError

journal_app = typer.Typer(help="Maintain the recovery site's journal.", no_args_is_help=True)
app.add_typer(journal_app, name="journal")


@journal_app.command("repair-index")
def repair_index(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Rebuild the index from the pack files' trailers (after index files were lost or damaged)."""
    from vmrep.journal import Journal

    cfg = config_from(config)
    # recover=False: recover() deletes unindexed packs no kept checkpoint needs, which a
    # lost index file may have listed for deduplication
    with Journal.open(cfg.journal_path, block_size=cfg.journal.block_size, create=False,
                      recover=False) as j:
        res = j.repair_index()
    if res.busy:
        raise VmrepError(f"journal {cfg.journal_path}: a garbage collection or recover is running; "
                         "try again when it has finished")
    if json_out:
        print_json(res)
    else:
        console.print(f"journal {cfg.journal_path}: indexed {res.blobs_indexed} blocks in "
                      f"{res.packs_indexed} packs (index file {res.index_file or 'none'}), "
                      f"replacing {res.index_files_replaced} index files", markup=False)
        for bad in res.bad_packs:
            console_err.print(f"warning: {bad}", markup=False, highlight=False)
    left_out = [b for b in res.bad_packs if b.endswith("left out")]
    if left_out:
        raise VmrepError(f"journal {cfg.journal_path}: {len(left_out)} pack(s) unreadable and not "
                         f"indexed (first: {left_out[0]}); run `vmrep verify` on each VPG")


@journal_app.command("serve")
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option("--host",
                                             help="address to listen on (default: journal.service.listen)")] = None,
    port: Annotated[int | None, typer.Option("--port", min=0, max=65535,
                                             help="port to listen on (default: journal.service.listen)")] = None,
) -> None:
    """Serve this site's journal over HTTPS to the protected sites (append-only for their
    writer credentials; see docs/journal-service.md). Runs until interrupted."""
    import logging
    import signal

    from vmrep.cli import signals
    from vmrep.journal.service import serve as run

    cfg = config_from(config)
    # A service: SIGTERM/Ctrl-C is how it ends (exit 0). uvicorn takes the signals while
    # it runs and raises them again after its shutdown: nothing is left to do by then.
    signals.stop_ends_successfully()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console_err.print(f"journal service for {cfg.journal_path}", markup=False, highlight=False)
    run(cfg, host=host, port=port)


@journal_app.command("retention")
def retention(
    vpgs: Annotated[list[str] | None, typer.Argument(
        help="VPGs to retain (default: every VPG recovered at --site, or every VPG)", show_default=False)] = None,
    site: Annotated[str | None, typer.Option("--site", help="only the VPGs recovered at this site")] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Apply the journal's retention here, at the recovery site, as the `retention/<site>`
    deployment does: history window, hard limit, and the locks (retention_lock_hours, the
    last clean checkpoint while encryption is suspected); raises and clears
    JOURNAL_LIMIT_LOCKED. For VPGs replicated through this site's journal service without
    Prefect (e.g. from cron)."""
    from vmrep.replication import engine
    from vmrep.runtime import get_runtime

    cfg = config_from(config)
    if site is not None:
        cfg.site(site)  # one line naming an unknown site
    for name in vpgs or []:
        cfg.vpg(name)  # one line naming an unknown VPG, before anything is done
    names = [v.name for v in cfg.vpgs if site is None or v.recovery_site == site]
    if vpgs:
        wrong = [n for n in vpgs if n not in names]
        if wrong:
            raise VmrepError(f"VPG {', '.join(wrong)}: not recovered at site {site}")
        names = [n for n in names if n in vpgs]
    assert cfg.source is not None  # loaded from a file
    rt = get_runtime(cfg.source)
    rows = [engine.retention_summary(engine.apply_retention(rt, rt.config.vpg(n), at_recovery_site=True))
            for n in names]
    if json_out:
        print_json(rows)
        return
    for r in rows:
        console.print(f"VPG {r['vpg']}: history from {r['base'] or 'nothing'}; {r['promoted']} promoted, "
                      f"{r['dropped_by_limit']} dropped by the hard limit"
                      + ("; the hard limit is blocked by locked history (JOURNAL_LIMIT_LOCKED)"
                         if r["lock_blocked_limit"] else ""), markup=False)
