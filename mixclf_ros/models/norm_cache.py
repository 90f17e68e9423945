"""Operator norms kept on disk between runs, so that a restart with the same weights configures
fast (a resnet18's convolution norms at 224x224 take about 7 s on a loaded 2-core CPU).

One JSON file, `<cache dir>/operator_norms.json`, maps keys made by the bound engine
(`core.bound_rules.Call.stored_norm`: a sha256 of the weight's contents, its dtype and shape, and
the setting: norm, input size, options) to norms. A changed weight has another key, so it is never
served a stale norm. The cache directory is `$MIXCLF_CACHE_DIR`, else `$XDG_CACHE_HOME/mixclf_ros`,
else `~/.cache/mixclf_ros`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

CACHE_DIR_VARIABLE = "MIXCLF_CACHE_DIR"


def cache_dir() -> Path:
    """Where the norms are kept (see the module docstring)."""
    if os.environ.get(CACHE_DIR_VARIABLE):
        return Path(os.environ[CACHE_DIR_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mixclf_ros"


class NormStore(dict):
    """The on-disk norms as a dict; `save` writes them back if any was added."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            self.update({key: float(value) for key, value in loaded.items()})
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError) as error:  # unreadable: computed again
            warnings.warn(f"operator-norm cache {path} is unreadable ({error}); norms are computed again",
                          stacklevel=2)
        self._saved = len(self)

    @classmethod
    def open(cls) -> NormStore:
        return cls(cache_dir() / "operator_norms.json")

    def save(self) -> None:
        """Writes the norms (atomically: a temporary file renamed) if any was added; a cache that
        cannot be written is reported as a warning, never an error."""
        if len(self) == self._saved:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(dict(self), sort_keys=True), encoding="utf-8")
            temporary.replace(self.path)
            self._saved = len(self)
        except OSError as error:
            warnings.warn(f"operator-norm cache {self.path} cannot be written ({error})", stacklevel=2)
