"""The one-command demo: camera simulator, monitor, launcher and frame rendering (needs rclpy)."""
