"""The ``saliency-sanity`` command line: run, report, track, methods, runs, config, train-reference, serve."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

import flows  # noqa: F401  (sets the environment defaults before Ray or Prefect are imported)

app = typer.Typer(help="Sanity checks for saliency maps at dataset scale: class sensitivity and model "
                       "parameter randomisation, on Ray, Prefect, Parquet and MLflow.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(soft_wrap=True)  # never break paths and commands across lines
#: `run`'s exit status when the results are complete on disk but logging them to MLflow failed (README).
EXIT_TRACKING_FAILED = 3

ConfigArg = Annotated[Optional[Path], typer.Argument(help="YAML config; omitted = the embedded default "
                                                     "(see `saliency-sanity config`)")]
OutOption = Annotated[Optional[str], typer.Option("--out", help="results root (path or URI, e.g. "
                                                  "s3://bucket/prefix); default: storage.out = runs")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="override a config field: "
                                                        "key.path=value (repeatable)")]


def _quiet_prefect(verbose: bool) -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")


class _NoPrefectErrors(logging.Filter):
    """Prefect's own error records (a failed or crashed task or flow, with its traceback): the CLI says
    what went wrong in one line instead; --verbose shows them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("prefect") and record.levelno >= logging.ERROR)


def _hide_prefect_errors() -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_NoPrefectErrors())


def _say_interrupted() -> None:
    console.print("[yellow]interrupted:[/yellow] re-run the same command to resume")
    sys.stdout.flush()


def _validated(config: Path | None, overrides: list[str]):
    from tasks.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as error:
        console.print(f"[red]config error:[/red] {error}")
        raise typer.Exit(2) from None


@app.command()
def run(config: ConfigArg = None, out: OutOption = None, set_: SetOption = None,
        verbose: Annotated[bool, typer.Option(help="show Prefect's logs")] = False,
        progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
        allow_code_change: Annotated[bool, typer.Option(
            help="resume a run directory made by other code or libraries (recorded in the manifest)")] = False,
        json_: Annotated[bool, typer.Option("--json", help="print only one JSON object at the end (verdicts, "
                                                         "controls, paths, counts), for scripts")] = False
        ) -> None:
    """Run the sanity checks (the Prefect flow `sanity_check`); re-running with the same config and
    --out resumes an interrupted run (refused if the code or libraries changed, unless --allow-code-change).
    Ends with the answer: the methods that fail per test and scope, and the controls."""
    overrides = list(set_ or [])
    _quiet_prefect(verbose)
    from flows.services import (EXIT_INTERRUPTED, RunInterrupted, prefect_api, prefect_server, protect_run,
                                stop_on_signals)

    protect_run()
    try:
        # the temporary Prefect server boots while the config is checked and the flow's modules load
        with stop_on_signals(on_force=_say_interrupted), prefect_server() as server:
            cfg = _validated(config, overrides)
            from flows.sanity_check import sanity_check

            progress = progress and not json_
            if not json_:
                console.print(f"run [bold]{cfg.run_name()}[/bold]: {cfg.model.name} on {cfg.data.dataset}, "
                              f"{len(cfg.methods.ids)} methods")
            if not verbose:
                _hide_prefect_errors()
            with prefect_api(server):
                outcome = sanity_check(config=cfg, out=out, progress=progress, allow_code_change=allow_code_change)
    except typer.Exit:  # a config error, said already
        raise
    except RunInterrupted:
        _say_interrupted()
        os._exit(EXIT_INTERRUPTED)  # the actors, Ray and the Prefect server are stopped by now; threads still
        # waiting on the stopped Ray and atexit hooks would only delay the exit (the watchdog reaps the rest)
    except Exception as error:
        if verbose:
            console.print_exception()
        from tasks.storage import resource_error, resource_message

        full = resource_error(error)  # e.g. the disk filled while writing the summary
        lines = ([resource_message(full)] if full is not None else str(error).strip().splitlines()) or [
            type(error).__name__]
        console.print(f"[red]run failed:[/red] {lines[0]}" + ("" if verbose else " (--verbose for details)"))
        raise typer.Exit(1) from None
    answer = _answer(outcome["run_dir"])
    if json_:
        print(json.dumps(_json_summary(outcome, answer), indent=2))
        raise typer.Exit(EXIT_TRACKING_FAILED if outcome.get("tracking_error") else 0)
    stats = outcome["stats"]
    if outcome.get("already_complete"):
        console.print(f"[green]already complete[/green]: {outcome['run_dir']}"
                      + (f", MLflow run {outcome['mlflow_run_id']}" if outcome["mlflow_run_id"] else "")
                      + " (same config, code, weights, data and verdict rules: nothing computed or logged)")
    console.print(f"[green]done[/green] in {stats['wall_seconds']:.0f} s: {stats['images']} images "
                  f"({stats['images_computed']} computed at {stats['images_per_second']:.1f} img/s, "
                  f"{stats['shards_skipped']} shards resumed), {stats['score_rows']} scores, "
                  f"{stats['failures']} failures")
    if stats["shards_rejected"]:
        console.print(f"[yellow]{stats['shards_rejected']} stored shard(s) did not match the plan[/yellow] and were "
                      "recomputed (see the log for why)")
    for method, count in stats["non_finite_maps"].items():
        hint = (" (LRP's canonizer should keep relevance finite on any model it accepts: please report the "
                "model)" if method.startswith("lrp") else "")
        console.print(f"[yellow]non-finite maps:[/yellow] {method} on {count} of {stats['images']} images; "
                      f"those scores are left out, the failures table names each{hint}")
    if not progress:  # shown in the first lines otherwise
        console.print(outcome["model_origin"])
        console.print(outcome["model"])
    if answer is not None:
        from tasks.answer import summary_lines

        print("\n".join(summary_lines(answer)))  # plain print: never wrapped or cut at the terminal's width
    if outcome.get("changes"):
        from tasks.answer import change_lines

        print("\n".join(change_lines(outcome["changes"])))
    console.print(f"results:   {outcome['run_dir']}")
    console.print(f"summary:   {outcome['summary']}")
    if outcome["report"]:
        console.print(f"report:    {outcome['report']}")
    if outcome["mlflow_run_id"]:
        console.print(f"MLflow run {outcome['mlflow_run_id']} in {outcome['tracking_uri']}")
        console.print(f"open the MLflow UI: [bold]{outcome['mlflow_ui']}[/bold]")
    elif outcome.get("tracking_error"):
        console.print(f"[yellow]MLflow tracking failed[/yellow] ({outcome['tracking_error']}); the results above are "
                      f"complete on disk: log them later with [bold]saliency-sanity track {outcome['run_dir']}[/bold]")
        raise typer.Exit(EXIT_TRACKING_FAILED)


def _answer(run_dir: str) -> dict | None:
    """The run's verdict summary (tasks.answer), or None for a run without verdicts."""
    from tasks.answer import verdict_summary
    from tasks.storage import RunDir

    directory = RunDir(run_dir)
    return verdict_summary(directory.read_table("verdicts.parquet")) if directory.exists("verdicts.parquet") else None


def _json_summary(outcome: dict, answer: dict | None) -> dict:
    """What `run --json` prints: the verdict summary, the model check, where the results are, the counts."""
    keys = ("run_dir", "run_id", "summary", "report", "mlflow_run_id", "tracking_uri", "tracking_error", "model",
            "stats", "already_complete", "changes")
    return {**{key: outcome.get(key) for key in keys}, "verdicts": answer}


@app.command()
def report(run_dir: Annotated[str, typer.Argument(help="a run directory (path or URI)")]) -> None:
    """Write the figures and index.html of a run directory into RUN_DIR/report/."""
    from tasks.manifest import ManifestChanged
    from tasks.report_run import write_run_report
    from tasks.storage import RunDir

    directory = RunDir(run_dir)
    if not directory.exists("summary.parquet"):
        console.print(f"[red]{directory} has no summary.parquet[/red]: not a finished run directory")
        raise typer.Exit(1)
    try:
        write_run_report(directory)
    except ManifestChanged as error:
        console.print(f"[red]refused:[/red] {error}")
        raise typer.Exit(1) from None
    console.print(f"report: {directory.file('report', 'index.html')}")


@app.command()
def compare(run_dirs: Annotated[list[str], typer.Argument(help="finished run directories (paths or URIs)")],
            out: Annotated[str, typer.Option("--out", help="folder of the comparison page")] = "compare") -> None:
    """Place runs side by side: per method and test each run's verdict and R [95% CI] (printed, and as
    a page in --out with the same method's MPRT curves of every run overlaid)."""
    from tasks.compare import format_comparison, load_runs, write_comparison

    try:
        runs = load_runs(run_dirs)
    except ValueError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    print(format_comparison(runs))  # plain print: no wrapping or truncation at the terminal's width
    console.print(f"page: {write_comparison(runs, out)}")


@app.command()
def methods() -> None:
    """List the saliency method ids: family, gradient policy, whether the id is a published default, whether
    it is in the default run, and the signed method it is compared with in comparisons.parquet."""
    from saliency.methods import PAPER_METHODS, method_table

    rows = [[row["id"], row["family"], str(row["policy"] or "–"), "yes" if row["default"] else "",
             "yes" if row["id"] in PAPER_METHODS else "", row["signed_counterpart"] or ""]
            for row in method_table()]
    print(plain_table(["id", "family", "policy", "default", "in default run", "compared with"], rows), end="")


@app.command()
def config() -> None:
    """Print the embedded default configuration: every field, its default and what it means."""
    from tasks.config import default_yaml

    print(default_yaml(), end="")


@app.command()
def runs(out: OutOption = None,
         tracking_uri: Annotated[Optional[str], typer.Option(
             help="MLflow tracking URI; default: $MLFLOW_TRACKING_URI or sqlite:///<out>/mlflow.db")] = None,
         experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "saliency-sanity",
         limit: Annotated[int, typer.Option(help="most recent runs to show")] = 20) -> None:
    """List the runs in the MLflow tracking store with their headline metrics."""
    from tasks.config import load_config
    from tasks.tracking import tracking_uri as default_uri

    cfg = load_config()
    if out is not None:
        cfg.storage.out = out
    uri = tracking_uri or default_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        console.print(f"no tracking store at {uri}: run `saliency-sanity run` first")
        raise typer.Exit(1)
    import mlflow

    mlflow.set_tracking_uri(uri)
    frame = mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time DESC"],
                               max_results=limit)
    columns = {"images": "metrics.run/images", "failures": "metrics.run/failures",
               "img/s": "metrics.run/images_per_second", "wall s": "metrics.run/wall_seconds",
               "verdicts fail": "metrics.verdicts/fail", "verdicts pass": "metrics.verdicts/pass"}
    rows = [[row["run_id"], str(row.get("tags.mlflow.runName", "")), str(row["status"]),
             str(row["start_time"])[:19], *[_format(row.get(column)) for column in columns.values()],
             str(row.get("tags.run_dir") or "–")] for _, row in frame.iterrows()]
    print(f"{experiment} in {uri}")
    print(plain_table(["MLflow run id", "name", "status", "start", *columns, "run directory"], rows), end="")


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their longest cell, never wrapped or cut: whatever the terminal's width (and
    $COLUMNS), every run id and path is printed whole (a long line wraps in the terminal, unbroken)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() + "\n"
                   for line in lines)


def _format(value) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    return f"{value:.1f}" if isinstance(value, float) and not value.is_integer() else f"{value:.0f}"


@app.command()
def track(run_dir: Annotated[str, typer.Argument(help="a finished run directory (path or URI)")],
          tracking_uri: Annotated[Optional[str], typer.Option(
              help="MLflow tracking URI; default: the run's tracking.uri, $MLFLOW_TRACKING_URI or "
                   "sqlite:///<out>/mlflow.db")] = None,
          experiment: Annotated[Optional[str], typer.Option(help="default: the run's tracking.experiment")] = None
          ) -> None:
    """Log a finished run directory to MLflow (e.g. when tracking failed at the end of its run); once
    only: a second `track` of the same directory finds the first MLflow run and logs nothing."""
    from tasks.manifest import ManifestChanged
    from tasks.storage import RunDir
    from tasks.tracking import TrackingUnavailable, track_run_dir

    directory = RunDir(run_dir)
    if not (directory.exists("summary.parquet") and directory.exists("manifest.json")):
        console.print(f"[red]{directory} has no summary.parquet[/red]: not a finished run directory")
        raise typer.Exit(1)
    try:
        run_id, logged = track_run_dir(directory, tracking_uri, experiment)
    except TrackingUnavailable as error:
        console.print(f"[red]tracking unavailable:[/red] {error}")
        raise typer.Exit(1) from None
    except ManifestChanged as error:  # its scores would be logged under a plan they do not match
        console.print(f"[red]refused:[/red] {error}")
        raise typer.Exit(1) from None
    console.print(f"{'logged as' if logged else 'already logged as'} MLflow run {run_id}")


@app.command("train-reference")
def train_reference(force: Annotated[bool, typer.Option(help="retrain even if cached")] = False,
                    cache_dir: Annotated[Optional[str], typer.Option(help="default: $SALIENCY_SANITY_CACHE "
                                                                     "or ~/.cache/saliency-sanity")] = None,
                    seed: int = 0, verbose: bool = False,
                    architecture: Annotated[str, typer.Option(help="reference (the CNN) or reference_resnet")]
                    = "reference") -> None:
    """Train a reference model on the bundled MNIST digits (cached; a run does it on first use)."""
    _quiet_prefect(verbose)
    from flows.train_reference import train_reference_flow

    info = train_reference_flow(force=force, cache_dir=cache_dir, seed=seed, progress=True,
                                architecture=architecture)
    state = "loaded from cache" if info.get("cached") else f"trained in {info.get('seconds', 0):.0f} s"
    console.print(f"{architecture} model {state}: accuracy {info.get('accuracy', float('nan')):.4f} on the "
                  f"held-out digits; weights at {info['cache_path']}")


@app.command()
def serve(config: ConfigArg = None, out: OutOption = None, set_: SetOption = None,
          cron: Annotated[Optional[str], typer.Option(help="cron schedule; default: the one of "
                                                      "deployments/prefect.yaml")] = None) -> None:
    """Serve the scheduled `sanity_check` deployment from this process (no work pool needed); refused
    when its own config could never run (a model factory not on $SALIENCY_SANITY_ALLOWED_FACTORIES)."""
    overrides = list(set_ or [])
    cfg = _validated(config, overrides)
    from flows.sanity_check import DEFAULT_CRON, SERVED_DEPLOYMENT_NAME, check_factory_allowed, sanity_check
    from tasks.config import ConfigError

    try:
        check_factory_allowed(cfg, deployed=True)  # else every scheduled run would fail at its start
    except ConfigError as error:
        console.print(f"[red]config error:[/red] not serving: its own config could never run: {error}")
        raise typer.Exit(2) from None

    parameters = {"config": None if config is None else str(config.resolve()),
                  "out": None if out is None else (out if "://" in out else str(Path(out).resolve())),
                  "overrides": overrides}
    console.print(f"serving deployment sanity_check/{SERVED_DEPLOYMENT_NAME} on cron {cron or DEFAULT_CRON!r}")
    sanity_check.serve(name=SERVED_DEPLOYMENT_NAME, cron=cron or DEFAULT_CRON, parameters=parameters)


if __name__ == "__main__":
    app()
