"""Checkpoints of finished work units: one small file per unit in a folder next to the outputs,
written atomically (temporary file, then rename), so an interrupted run resumes where it stopped and
never reads a half-written result."""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch


class UnitStore:
    """`<folder>/<unit key>.pt` files: {"fingerprint": str, "result": dict of tensors and numbers}."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", key) + ".pt")

    def load(self, key: str, fingerprint: str) -> dict[str, Any] | None:
        """The checkpointed result of `key`, or None if there is none, it is unreadable, or it was made
        under another fingerprint (other models, data, seed or settings)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged file is recomputed, not trusted
            return None
        if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint or saved.get("key") != key:
            return None
        return saved["result"]

    def save(self, key: str, fingerprint: str, result: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({"key": key, "fingerprint": fingerprint, "result": result}, buffer)
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".unit-", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(buffer.getvalue())
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path(key))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
