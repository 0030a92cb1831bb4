"""What the `distillery` commands share: options, opening the store, errors, dataset refs.

Each ``cli_*.py`` module holds one command group; anything two of them use lives here, so
the command modules never import each other for plumbing.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from distillery.core.config import load_settings
from distillery.core.errors import DistilleryError
from distillery.core.serialize import dumps
from distillery.curation.training.backends import LIMITS, JobEvent, Method
from distillery.store import Store, datasets, open_store
from distillery.store.query import Filters, parse_filters
from distillery.store.records import DatasetVersionRecord

FC = TypeVar("FC", bound=Callable[..., Any])


class DefaultGroup(click.Group):
    """A group that runs ``list`` when no subcommand is named (``llm logs`` style)."""

    default_command = "list"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args.insert(0, self.default_command)
        return super().parse_args(ctx, args)


def store_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--database-url",
        envvar="DISTILLERY_DATABASE_URL",
        help="sqlite:///path.db or postgresql://...  [default: as the proxy]",
    )(command)
    return click.option(
        "-c",
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="DISTILLERY_CONFIG",
        help="TOML config file (for the database location).",
    )(command)


count_option = click.option(
    "-n",
    "--count",
    "limit",
    type=int,
    default=20,
    show_default=True,
    help="How many, newest first; 0 for all.",
)


def filter_options(
    command: Callable[..., Any], model_flags: tuple[str, ...] = ("-m", "--model")
) -> Callable[..., Any]:
    options = [
        click.option(
            "--tag",
            "tags",
            multiple=True,
            metavar="KEY=VALUE",
            help="Has this tag (repeatable, all must match).",
        ),
        click.option(*model_flags, "model", help="Model requested or served."),
        click.option(
            "--since",
            metavar="WHEN",
            help="Captured at or after: 2026-11-01, 2026-11-01T09:00, 7d, 12h.",
        ),
        click.option("--until", metavar="WHEN", help="Captured before."),
        click.option("--status", type=click.Choice(["ok", "error"]), help="Succeeded or failed."),
        click.option("--finish-reason", help="stop, length, tool_calls, content_filter, ..."),
        click.option(
            "--stream/--no-stream", default=None, help="Streamed calls only, or only not."
        ),
        click.option(
            "-q",
            "--search",
            "text",
            metavar="TEXT",
            help="Full-text search over messages and output.",
        ),
        click.option(
            "--tenant", "tenants", multiple=True, help="API-key fingerprint (repeatable)."
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_filters(**options: Any) -> Filters:
    """The filter options as the store's Filters (no --tenant: every tenant)."""
    return parse_filters(**{**options, "tenants": options.get("tenants") or None})


def open_cli_store(config: Path | None, database_url: str | None, must_exist: bool = True) -> Store:
    """The store the command works on, closed when the command ends; a SQLite file that is
    not there is an error naming the fix (unless the command makes one)."""
    settings = load_settings(config, {"storage.database_url": database_url})
    url = settings.storage.resolved_database_url()
    if (
        must_exist
        and url.startswith("sqlite:///")
        and not Path(url.removeprefix("sqlite:///")).exists()
    ):
        raise DistilleryError(
            f"No database at {url}. Start `distillery proxy` to capture calls, or point "
            "--database-url at an existing one."
        )
    store = open_store(url)
    # Closed when the command ends, so no connection outlives it.
    click.get_current_context().call_on_close(store.close)
    return store


def fail_on_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn DistilleryError into a one-line message naming the fix."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DistilleryError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def parse_ref(ref: str) -> tuple[str, int | None]:
    name, _, version = ref.partition("@")
    if not name:
        raise click.UsageError(f"{ref!r} is not NAME or NAME@VERSION.")
    if not version:
        return name, None
    try:
        return name, int(version.removeprefix("v"))
    except ValueError:
        raise click.UsageError(
            f"{ref!r}: the version after @ must be a number, like {name}@3."
        ) from None


def resolve(store: Any, ref: str) -> DatasetVersionRecord:

    name, version = parse_ref(ref)
    found = datasets.get(store, name, version)
    if found is None:
        which = f"version {version} of dataset {name!r}" if version else f"dataset {name!r}"
        raise DistilleryError(f"No {which}. Run `distillery dataset list` to see names.")
    return found


def hyperparameter(name: str, *declarations: str, **kwargs: Any) -> Callable[[FC], FC]:
    """The option for a hyperparameter, its range the one every backend is held to."""
    limit = LIMITS[name]
    kind: click.IntRange | click.FloatRange = (
        click.IntRange(int(limit.low), None if limit.high is None else int(limit.high))
        if limit.kind is int
        else click.FloatRange(limit.low, limit.high, min_open=limit.open)
    )
    return click.option(*(declarations or (f"--{name.replace('_', '-')}",)), type=kind, **kwargs)


def local_method(full: bool, lora: bool) -> Method:
    """What --full and --lora ask of a local fine-tune (neither: the trainer chooses)."""
    if full and lora:
        raise click.UsageError("Cannot use --full and --lora together.")
    return "lora" if lora else ("full" if full else "auto")


def local_method_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--full, --lora and --threads, for `finetune create` and `distill` alike."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option(
            "--full",
            is_flag=True,
            help="local: train every weight  [default: for models made from scratch or under "
            "30M parameters]",
        ),
        click.option(
            "--lora", is_flag=True, help="local: train a LoRA adapter  [default: larger models]"
        ),
        hyperparameter("threads", help="local: CPU threads  [default: half the cores, at most 8]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def fail_under_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--fail-under",
        multiple=True,
        metavar="[GRADER=]VALUE",
        help=f"Exit 1 when {what} mean for GRADER is below VALUE (repeatable). A bare VALUE "
        "applies to every grader, and only when they all score on one scale.",
    )


max_error_rate_option = click.option(
    "--max-error-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of items a candidate may fail (no answer, or a grader without a score) "
    "before the run exits 1.",
)


def thresholds(specs: tuple[str, ...], graders: list[Any]) -> dict[str, float]:
    """``--fail-under`` values by grader name; one bare number only for graders on one scale."""
    names = [g.name for g in graders]
    out: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise click.UsageError(
                f"--fail-under takes GRADER=VALUE or a number, not {spec!r}."
            ) from None
        if sep:
            if name not in names:
                raise click.UsageError(
                    f"--fail-under {spec}: no grader {name!r} in this run ({', '.join(names)})."
                )
            out[name] = number
            continue
        scales = {g.scale() for g in graders}
        if len(scales) > 1:
            each = ", ".join(f"{g.name} {g.scale()[0]:g}-{g.scale()[1]:g}" for g in graders)
            raise click.UsageError(
                f"--fail-under {value} would apply one number to graders on different scales "
                f"({each}): give one per grader, e.g. --fail-under {names[0]}=VALUE."
            )
        out.update(dict.fromkeys(names, number))
    return out


def _tag_key(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.startswith("tag:"):
        raise click.BadParameter("--by takes tag:KEY, e.g. --by tag:app.")
    return value


by_tag_option = click.option(
    "--by",
    "by_tag",
    metavar="tag:KEY",
    callback=_tag_key,
    help="Break scores down by a tag.",
)


class Progress:
    """A progress bar on stderr when it is a terminal, nothing in a pipe; it starts once
    the work knows its total (``start``), and ``with`` closes it however the work ends."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    def start(self, total: int) -> None:
        if sys.stderr.isatty():
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


class TrainingProgress:
    """A fine-tune's events as its user wants them: on a terminal, one line kept current
    (epoch, step, losses, time left); in a pipe, a line per epoch and the other messages
    as they come; with ``as_json``, every event as a JSON line on stdout, for machines.

    Time left comes from the events' own times (the trainer's clock), so following a job
    that started earlier, or replaying one that ended, says the same."""

    def __init__(self, as_json: bool = False, terminal: bool | None = None) -> None:
        self.as_json = as_json
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.first: tuple[float, int] | None = None  # (time, step) of the first step seen
        self.train_loss: float | None = None
        self.valid_loss: float | None = None
        self.valid_accuracy: float | None = None
        self.drawn = False  # a status line is on the terminal, to be overwritten

    def __call__(self, event: JobEvent) -> None:
        if self.as_json:
            click.echo(dumps(event))
            return
        data = event["data"] or {}
        if "step" not in data or "max_steps" not in data:  # a message, or another backend's
            losses = ", ".join(f"{k}={v}" for k, v in data.items() if "loss" in k or k == "step")
            suffix = f"  ({losses})" if losses else ""
            self.say(f"{event['level']:<5} {event['message']}{suffix}")
            return
        self.train_loss = data.get("train_loss", self.train_loss)
        self.valid_loss = data.get("valid_loss", self.valid_loss)
        self.valid_accuracy = data.get("valid_accuracy", self.valid_accuracy)
        when = cast(dict[str, Any], event).get("time")  # the trainer's clock, where it has one
        line = self.line(data, when if isinstance(when, (int, float)) else None)
        if self.terminal:
            click.echo("\r\x1b[2K" + line, nl=False, err=True, color=True)
            self.drawn = True
        elif data.get("epoch_end"):
            click.echo(line, err=True)

    def line(self, data: dict[str, Any], when: float | None) -> str:
        step, steps = int(data["step"]), int(data["max_steps"])
        epochs = data.get("epochs")
        epoch = data.get("epoch") or 0
        where = f"epoch {round(epoch, 2):g}" + (f"/{epochs:g}" if epochs else "")
        parts = [where, f"step {step}/{steps}"]
        if self.train_loss is not None:
            parts.append(f"train loss {self.train_loss:.4f}")
        if self.valid_loss is not None:
            parts.append(f"val loss {self.valid_loss:.4f}")
        if self.valid_accuracy is not None:
            parts.append(f"val token accuracy {self.valid_accuracy:.3f}")
        left = self._left(step, steps, when)
        if left is not None:
            parts.append(f"{left} left at most")
        return ", ".join(parts)

    def _left(self, step: int, steps: int, when: float | None) -> str | None:
        if when is None:
            return None
        if self.first is None or step < self.first[1]:
            self.first = (when, step)
            return None
        started, first_step = self.first
        if step == first_step:
            return None
        seconds = (when - started) / (step - first_step) * max(steps - step, 0)
        minutes, seconds = divmod(round(seconds), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"

    def say(self, text: str) -> None:
        """A line of its own on stderr (below the status line, on a terminal)."""
        if self.drawn:
            click.echo("", err=True)  # keep the status line; the message goes below it
            self.drawn = False
        click.echo(text, err=True)

    def close(self) -> None:
        if self.drawn:
            click.echo("", err=True)
            self.drawn = False

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
