"""Output of the experiments: strict JSON, CSV (floats as 6 significant digits) and plain-text tables."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mixclf_ros.evaluation.settings import PGDSettings


def json_ready(value: Any) -> Any:
    """NaN / inf -> None, tensors -> lists, dataclasses of settings -> dicts (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return json_ready(value.tolist())
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if callable(getattr(value, "report", None)):  # evaluation.units.Execution: what ran where, how fast
        return json_ready(value.report())
    if isinstance(value, PGDSettings):
        return {"norm": value.norm, "eps": value.eps, "steps": value.steps,
                "step_size": value.resolved_step_size, "restarts": value.restarts}
    return value


def write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(json_ready(content), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One line per row; columns = the union of the rows' keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value)
                             for key, value in row.items()})


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table with right-aligned columns; floats as 4 decimals."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    text_rows = [[cell(value) for value in row] for row in rows]
    widths = [max(len(str(header)), *(len(row[i]) for row in text_rows)) if text_rows else len(str(header))
              for i, header in enumerate(headers)]
    lines = ["  ".join(str(header).rjust(width) for header, width in zip(headers, widths))]
    lines.extend("  ".join(value.rjust(width) for value, width in zip(row, widths)) for row in text_rows)
    return "\n".join(lines)
