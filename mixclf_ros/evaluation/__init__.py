"""The `mixclf-eval` CLI: evidence for choosing alpha (sweeps, margins, certification, design)."""
