"""ROS 2 glue: the `mixclf` lifecycle node. Imports rclpy; nothing in the library imports this."""
