"""Frames in, certified results out: `CertifiedClassifier`, `FrameResult` and `is_safe` (no ROS)."""
