"""The `kagent` command line: thin click commands over agent/, memory/ and editors/.

Every command takes `--workspace DIR` (default: $KAGENT_HOME/workspace or the user data dir). User errors are one
line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import asdict
from pathlib import Path

import click
from transformers.utils import logging as transformers_logging

from agent import schedule as sched
from agent import views
from agent.batch import compute
from agent.consolidate import consolidate as consolidate_live
from agent.config import ConfigError, checked_config
from agent.loop import WatchOptions, watch as watch_feed
from agent.report import render_report
from agent.schedule import ScheduleError
from agent.tiers import export_tiers
from agent.session import create_workspace, open_ledger, open_session
from agent.workspace import Workspace, WorkspaceError, default_root
from editors.arch import UnknownArchitecture
from editors.entity_memory import EntityMemory
from editors.models import DEFAULT_MODEL, DTYPE_CHOICES, DeviceUnavailable, fingerprint, load_model
from editors.registry import METHODS, resolve_hparams
from editors.user_corpus import CorpusError
from memory.gguf_export import SourceMissing
from memory import model_sync
from memory.hygiene import shown
from memory.ledger import LedgerError, LedgerMismatch

USER_ERRORS = (WorkspaceError, ConfigError, ScheduleError, LedgerError, UnknownArchitecture, DeviceUnavailable, CorpusError,
               FileNotFoundError, FileExistsError, OSError, SourceMissing, sqlite3.OperationalError)  # last: disk full


class KagentGroup(click.Group):
    """Turns user errors into one-line messages with exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from None


def workspace_option(fn):
    return click.option("--workspace", "-w", type=click.Path(path_type=Path), envvar="KAGENT_WORKSPACE",
                        help="Workspace directory [default: $KAGENT_HOME/workspace]")(fn)


def dtype_option(fn):
    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
                        help="Model dtype (auto: bfloat16 on CUDA, float32 on CPU)")(fn)


def device_map_option(fn):
    return click.option("--device-map", type=click.Choice(["auto"]), default=None,
                        help="Spread the model over the visible GPUs with accelerate (ignores --device)")(fn)


def stats_corpus_option(fn):
    return click.option("--stats-corpus", type=click.Path(exists=True, path_type=Path), default=None,
                        help="Text or JSONL file, or a directory of them, for the covariance statistics "
                        "[default: the shipped WikiText-2 part]")(fn)


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Output JSON")(fn)


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


def ws_root(workspace: Path | None) -> Path:
    return workspace or default_root()


@click.group(cls=KagentGroup)
@click.version_option(package_name="kagent")
@click.option("-v", "--verbose", count=True, help="Log more (-vv for debug)")
def cli(verbose: int) -> None:
    """kagent: keep an LLM's facts current by editing its weights from a feed of fact updates."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        transformers_logging.disable_progress_bar()  # "Loading weights" bars on every command are noise


@cli.command()
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help="Embedded alias, local HF dir or hub name")
@click.option("--method", default="encore", show_default=True, type=click.Choice(METHODS.names()))
@click.option("--layers", callback=lambda _ctx, _param, text: parse_layers(text),
              help="Edited layers, comma-separated [default: the method's choice for the model]")
@click.option("--stats-tokens", type=click.IntRange(0), default=0, help="Corpus tokens for covariance statistics "
              "[default: the method's]")
@click.option("--device", default="auto", show_default=True, help="torch device")
@dtype_option
@device_map_option
@click.option("--hparams", "hparams_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML or JSON file of editor hyperparameters [default: the per-model defaults]")
@stats_corpus_option
@workspace_option
def init(model: str, method: str, layers: list[int], stats_tokens: int, device: str, dtype: str, device_map: str,
         hparams_file: str, stats_corpus: Path | None, workspace: Path | None) -> None:
    """Create a workspace (config, ledger, index, caches) and measure the probe baselines."""
    cfg = checked_config(dict(model=model, method=method, layers=layers, stats_tokens=stats_tokens, device=device,
                              dtype=dtype, device_map=device_map or "",
                              hparams_file=str(Path(hparams_file).resolve()) if hparams_file else "",
                              stats_corpus=str(stats_corpus.resolve()) if stats_corpus else ""), "kagent init")
    root = ws_root(workspace)
    if Workspace(root).exists():
        raise WorkspaceError(f"a workspace already exists at {root}")
    loaded = load_checked(model, cfg.load_options())
    ws, baseline = create_workspace(root, cfg, loaded)
    cfg = ws.config()
    chosen = chosen_hparams(cfg, loaded.model.config)
    acc = "n/a" if baseline.known_acc is None else f"{baseline.known_acc:.3f}"
    click.echo(f"initialised {ws.root}: {model} ({method}, {cfg.dtype}); baseline known-fact accuracy {acc}, "
               f"perplexity {baseline.perplexity:.2f}")
    click.echo(f"{method} settings: {chosen.summary()}")


def chosen_hparams(cfg, config):
    """The editor settings `kagent init` will use and why; a bad --hparams file is a one-line error."""
    try:
        return resolve_hparams(cfg.method, config, cfg.hparams_file or None, **cfg.hparam_overrides())
    except ValueError as exc:
        first = " ".join(str(exc).split())[:300]
        raise click.ClickException(f"--hparams {cfg.hparams_file}: {first}") from None


def parse_layers(text: str | None) -> list[int]:
    """--layers 3,4,5 as a list; anything else is a usage error."""
    try:
        return [int(x) for x in text.split(",")] if text else []
    except ValueError:
        raise click.BadParameter(f"{text!r}: give layer numbers separated by commas, e.g. 3,4,5") from None


def load_checked(model: str, options: dict):
    """load_model(model, **options) with loading failures (not a model, missing files) as one-line user errors."""
    try:
        return load_model(model, **options)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise click.ClickException(f"cannot load model {model!r}: {first}") from None


@cli.command()
@click.argument("feed", type=click.Path(path_type=Path))
@click.option("--once", is_flag=True, help="Process what is in the feed now, then exit")
@click.option("--batch-size", type=click.IntRange(1), help="Facts per batch [default: from config]")
@click.option("--max-wait", type=click.FloatRange(0), help="Seconds before a partial batch [default: from config]")
@workspace_option
def watch(feed: Path, once: bool, batch_size: int | None, max_wait: float | None, workspace: Path | None) -> None:
    """Follow FEED (JSONL) like tail -F and apply its facts in guarded batches."""
    ws = Workspace.open(ws_root(workspace))
    if once and not feed.exists():
        raise click.ClickException(f"feed {feed} does not exist")
    with ws.writer():
        remember_feed(ws, feed)
        summary = run_feed(ws, feed, once, batch_size, max_wait)
    click.echo(summary.line())


def remember_feed(ws: Workspace, feed: Path) -> None:
    cfg = ws.config()
    key = str(feed.expanduser().resolve())
    if key not in cfg.feeds:
        ws.save_config(cfg.model_copy(update={"feeds": cfg.feeds + [key]}))


def run_feed(ws: Workspace, feed: Path, once: bool, batch_size: int | None, max_wait: float | None):
    session = open_session(ws)
    try:
        opts = WatchOptions(once=once, batch_size=batch_size or session.cfg.batch_size,
                            max_wait=session.cfg.max_wait if max_wait is None else max_wait)
        return watch_feed(session, feed, opts, echo=click.echo)
    finally:
        session.close()


@cli.command()
@workspace_option
def refresh(workspace: Path | None) -> None:
    """Process every configured feed once (what a nightly job runs)."""
    ws = Workspace.open(ws_root(workspace))
    with ws.writer():
        feeds = ws.config().feeds
        if not feeds:
            click.echo("no feeds configured; add one with `kagent watch FEED --once`")
        for feed in feeds:
            click.echo(f"{shown(feed)}: {run_feed(ws, Path(feed), True, None, None).line()}")
        if ws.config().consolidate_on_refresh:
            click.echo(run_consolidation(ws).line())


@cli.command()
@json_option
@workspace_option
def consolidate(as_json: bool, workspace: Path | None) -> None:
    """Re-solve every applied fact from the base weights as one batch that replaces the chain."""
    ws = Workspace.open(ws_root(workspace))
    with ws.writer():
        done = run_consolidation(ws)
    if as_json:
        echo_json(asdict(done))
    else:
        click.echo(done.line())


def run_consolidation(ws: Workspace):
    session = open_session(ws)
    try:
        return consolidate_live(session)
    finally:
        session.close()


@cli.command()
@click.option("--limit", "-n", type=click.IntRange(0), default=20, show_default=True, help="Batches to show (0 = all)")
@json_option
@workspace_option
def history(limit: int, as_json: bool, workspace: Path | None) -> None:
    """List batches, newest first: time, facts, method, key metrics, status."""
    with open_ledger(Workspace.open(ws_root(workspace))) as ledger:
        rows = views.history_rows(ledger, limit or None)
    if as_json:
        echo_json(rows)
    else:
        for row in rows:
            click.echo(views.history_line(row))


@cli.command()
@click.argument("item")
@json_option
@workspace_option
def show(item: str, as_json: bool, workspace: Path | None) -> None:
    """Show a batch (N or bN) or a fact (fN) with metrics and events."""
    with open_ledger(Workspace.open(ws_root(workspace))) as ledger:
        kind, num = parse_item(item)
        if as_json:
            echo_json(views.batch_json(ledger, num) if kind == "b" else views.fact_json(ledger, ledger.fact(num)))
        else:
            click.echo(views.batch_detail(ledger, num) if kind == "b" else views.fact_detail(ledger, ledger.fact(num)))


def parse_item(item: str) -> tuple[str, int]:
    kind = item[0].lower() if item[:1].isalpha() else "b"
    digits = item[1:] if item[:1].isalpha() else item
    if kind not in "bf" or not digits.isdigit():
        raise click.BadParameter(f"{item!r}: use a batch number (3 or b3) or a fact (f12)")
    return kind, int(digits)


@cli.command()
@click.option("--status", "-s", help="pending, applied, superseded, dropped, rolled_back or quarantined")
@click.option("--subject", help="Only facts whose subject contains this text")
@json_option
@workspace_option
def facts(status: str | None, subject: str | None, as_json: bool, workspace: Path | None) -> None:
    """List facts in the ledger with their status."""
    with open_ledger(Workspace.open(ws_root(workspace))) as ledger:
        found = [f for f in ledger.facts(status=status)
                 if subject is None or subject.casefold() in f.record.subject.casefold()]
    if as_json:
        echo_json([views.fact_row(f) for f in found])
    else:
        for f in found:
            click.echo(views.fact_line(f))


@cli.command()
@click.argument("prompt")
@click.option("--base", is_flag=True, help="Also answer with the unedited model, side by side")
@click.option("--tokens", type=click.IntRange(1), default=12, show_default=True, help="Tokens to generate")
@workspace_option
def ask(prompt: str, base: bool, tokens: int, workspace: Path | None) -> None:
    """Answer PROMPT with the edited model (--base: with the unedited one too)."""
    from evaluators.scoring import greedy_answers

    ws = Workspace.open(ws_root(workspace))
    cfg = ws.config()
    loaded = load_checked(cfg.model, cfg.load_options())
    before = greedy_answers(loaded.model, loaded.tok, [prompt], tokens)[0] if base else None
    with open_ledger(ws) as ledger:
        memory = load_edits(ledger, loaded)
    with views.edited(memory, loaded.model):
        after = greedy_answers(loaded.model, loaded.tok, [prompt], tokens)[0]
    if before is not None:
        click.echo(f"base:   {shown_lines(prompt + before)}")
        click.echo(f"edited: {shown_lines(prompt + after)}")
    else:
        click.echo(shown_lines(prompt + after))


def shown_lines(text: str) -> str:
    """Model text for the terminal: its line breaks kept (a model writes them), every other invisible or
    text-moving character escaped (memory.hygiene.shown)."""
    return "\n".join(shown(line) for line in text.split("\n"))


def load_edits(ledger, loaded) -> EntityMemory | None:
    """Write base + committed deltas into a freshly loaded model, after checking it is the ledger's base model;
    return the committed entity-memory slots (None when there are none) for `edited`."""
    expected, got = ledger.base_fingerprint(), fingerprint(loaded.model)
    if expected is not None and expected != got:
        raise LedgerMismatch(f"model {loaded.name} (fingerprint {got}) is not the base model of this workspace's "
                             f"ledger ({expected})")
    model_sync.load_into(ledger, loaded.model)
    return EntityMemory.from_write(loaded.tok, ledger.memory_write())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Output JSON")
@workspace_option
def check(as_json: bool, workspace: Path | None) -> None:
    """Ask the edited model every applied fact; exit 1 when one does not answer its target."""
    ws = Workspace.open(ws_root(workspace))
    cfg = ws.config()
    loaded = load_checked(cfg.model, cfg.load_options())
    with open_ledger(ws) as ledger:
        memory = load_edits(ledger, loaded)
        applied = ledger.facts(status="applied")
        probes = ledger.probes()
    with views.edited(memory, loaded.model):
        rows = views.check_rows(loaded.model, loaded.tok, applied, probes)
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for row in rows:
            click.echo(views.check_line(row))
        click.echo(views.check_summary(rows))
    if not all(r["took"] for r in rows):
        raise SystemExit(1)


@cli.command()
@click.argument("batch", type=int, required=False)
@click.option("--to", "to_batch", type=click.IntRange(0), help="Roll back every batch after this one (0 = all)")
@workspace_option
def rollback(batch: int | None, to_batch: int | None, workspace: Path | None) -> None:
    """Undo BATCH exactly (later batches are replayed), or everything after --to BATCH."""
    if (batch is None) == (to_batch is None):
        raise click.UsageError("give either BATCH or --to BATCH")
    ws = Workspace.open(ws_root(workspace))
    with ws.writer():
        session = open_session(ws)
        try:
            for msg in rollback_messages(session, batch, to_batch):
                click.echo(msg)
        finally:
            session.close()


def rollback_messages(session, batch: int | None, to_batch: int | None) -> list[str]:
    """Roll back and bring the entity memory to the remaining batches' slots."""
    state = session.editor.state
    try:
        if to_batch is not None:
            return [r.message for r in model_sync.rollback_to(session.ledger, to_batch, session.model, state)] or \
                [f"nothing committed after batch {to_batch}"]

        def recompute(facts):
            result = compute(session, facts)
            return result.delta, result.keys

        return [model_sync.rollback(session.ledger, batch, session.model, state, recompute).message]
    finally:
        session.sync_memory()


@cli.command()
@json_option
@workspace_option
def status(as_json: bool, workspace: Path | None) -> None:
    """Show the workspace: model, config, facts by status, last batch and baseline."""
    ws = Workspace.open(ws_root(workspace))
    with open_ledger(ws) as ledger:
        info = views.status_json(ws.root, ws.config(), ws.baseline(), ws.writer_holder(), ledger)
    if as_json:
        echo_json(info)
    else:
        click.echo(views.status_text(info))


@cli.command()
@json_option
@workspace_option
def verify(as_json: bool, workspace: Path | None) -> None:
    """Re-derive and check every delta, fingerprint and fact status in the ledger."""
    with open_ledger(Workspace.open(ws_root(workspace))) as ledger:
        problems = ledger.verify()
        summary = views.verify_summary(ledger)
    if as_json:
        echo_json({"ok": not problems, "problems": problems, "checked": summary})
    else:
        click.echo("\n".join(problems) if problems else f"OK: {summary}")
    if problems:
        raise SystemExit(1)


@cli.command()
@click.option("--dry-run", is_flag=True, help="List the orphan files, remove nothing")
@json_option
@workspace_option
def gc(dry_run: bool, as_json: bool, workspace: Path | None) -> None:
    """Remove tensor files no ledger row refers to (left by an interrupted commit)."""
    ws = Workspace.open(ws_root(workspace))
    with ws.writer(), open_ledger(ws) as ledger:
        files = [(p, p.stat().st_size) for p in ledger.orphan_files()]
        if not dry_run:
            ledger.gc()
    rows = [{"path": str(p.relative_to(ws.root)), "bytes": size} for p, size in files]
    if as_json:
        echo_json({"dry_run": dry_run, "files": rows})
        return
    verb = "would remove" if dry_run else "removed"
    for row in rows:
        click.echo(f"{verb} {row['path']} ({row['bytes']:,} bytes)")
    click.echo(f"{verb} {len(rows)} orphan file(s), {sum(r['bytes'] for r in rows):,} bytes")


@cli.command(name="export")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), default="hf", help="Weights tier: HF checkpoint or GGUF")
@workspace_option
def export_cmd(out_dir: Path, fmt: str, workspace: Path | None) -> None:
    """Write the weights tier (HF checkpoint or GGUF), the memory tier and a manifest of which fact lives where."""
    ws = Workspace.open(ws_root(workspace))
    cfg = ws.config()
    loaded = load_checked(cfg.model, cfg.load_options())
    with open_ledger(ws) as ledger:
        load_edits(ledger, loaded)
        path, answers = export_tiers(loaded, ledger, out_dir, fmt, cfg.model)
    click.echo(f"exported to {path}: the weights alone answer {sum(answers.values())} of {len(answers)} applied fact(s)")


@cli.command()
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("report.html"), show_default=True)
@click.option("--facts", "fact_limit", type=click.IntRange(1), default=2000, show_default=True,
              help="Latest facts to list in the facts table")
@workspace_option
def report(out: Path, fact_limit: int, workspace: Path | None) -> None:
    """Write an HTML report: plots vs edits, the event timeline, and tables of batches, facts and events."""
    ws = Workspace.open(ws_root(workspace))
    title = f"kagent report: {ws.config().model}"
    with open_ledger(ws) as ledger:
        data = views.report_data(ledger, title, baseline_values(ws.baseline()), fact_limit)
    out.write_text(render_report(data), encoding="utf-8")
    click.echo(f"wrote {out} ({len(data.batches)} batches, {len(data.facts)} of {data.facts_total} facts, "
               f"{len(data.events)} events)")


def baseline_values(baseline) -> dict[str, float]:
    if baseline is None:
        return {}
    return {"perplexity": baseline.perplexity} | ({} if baseline.known_acc is None else {"known_acc": baseline.known_acc})


@cli.command()
@click.option("--daily", required=True, metavar="HH:MM", help="Time of day to run `kagent refresh`")
@click.option("--systemd", is_flag=True, help="Write a systemd user timer instead of a crontab line")
@click.option("--dry-run", is_flag=True, help="Print what would be installed")
@workspace_option
def schedule(daily: str, systemd: bool, dry_run: bool, workspace: Path | None) -> None:
    """Schedule a daily `kagent refresh` with cron or a systemd user timer."""
    root = Workspace.open(ws_root(workspace)).root
    plan = sched.systemd_plan(root, daily, sched.default_unit_dir()) if systemd else sched.cron_plan(root, daily)
    if dry_run:
        click.echo(plan.describe())
    else:
        click.echo(sched.install_systemd(plan) if systemd else sched.install_cron(plan))


from agent.bench_cmd import bench, stats  # noqa: E402  (editor benchmark and covariance statistics)
from agent.serve_cmd import serve  # noqa: E402  (the OpenAI-compatible server)
for command in (bench, stats, serve):
    cli.add_command(command)
