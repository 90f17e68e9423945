"""Names of a run's output files under `--out`: `<command>_<run id>` by default (the run id is the UTC
start time, e.g. `certify_20250314T101500Z`), or `--name`; an existing run is never overwritten
silently (a default name takes a suffix and says so, a given name is refused without `--overwrite`)."""

from __future__ import annotations

import datetime
from pathlib import Path

from mixclf_ros.evaluation.settings import EvaluationError

OUTPUT_SUFFIXES = (".csv", ".json", ".png", "_summary.csv", "_frames.jsonl", ".units")
"""What a run `<stem>` writes next to each other (`.units`: the checkpoint folder of its work units)."""


def run_id(now: datetime.datetime | None = None) -> str:
    """The UTC time `now` (default: the current time) as a run id, e.g. 20250314T101500Z."""
    return (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")


def existing_outputs(out: Path, stem: str, checkpoints: bool = True) -> list[Path]:
    """The files of run `stem` already in `out` (with `checkpoints`, its checkpoint folder too)."""
    return [out / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES
            if (checkpoints or suffix != ".units") and (out / f"{stem}{suffix}").exists()]


def choose_stem(command: str, out: Path, name: str | None, overwrite: bool = False,
                resume: bool = False) -> tuple[str, str]:
    """The stem of this run's outputs and a note for the console ('' when there is nothing to say).

    `name` None: `<command>_<run id>`, with `_2`, `_3`, ... when a run of that name exists. A given
    `name` whose results exist is refused unless `overwrite` (replace them) or `resume` (the command
    continues that run); its checkpoints alone (an interrupted run) are resumed.
    Raises:
        EvaluationError: `name` has results in `out` and neither `overwrite` nor `resume` is set.
    """
    if name:
        found = existing_outputs(out, name, checkpoints=False)
        if found and not (overwrite or resume):
            raise EvaluationError(f"--name {name}: {', '.join(str(path) for path in found)} exist(s) already; give "
                                  "another --name, leave --name out (a new name per run), or add --overwrite to "
                                  "replace them")
        if found and overwrite and not resume:
            return name, f"--overwrite: replacing {', '.join(str(path) for path in found)}"
        if (out / f"{name}.units").exists() and not found:
            return name, f"resuming the run {out / name} from its checkpoints ({out / name}.units)"
        return name, ""
    stem = f"{command}_{run_id()}"
    chosen, number = stem, 1
    while existing_outputs(out, chosen):
        number += 1
        chosen = f"{stem}_{number}"
    taken = f"{out / stem}.* exist(s) already, so " if chosen != stem else ""
    return chosen, (f"{taken}writing {out / chosen}.* (if it is interrupted, rerun with --name {chosen} to resume "
                    "it)")
