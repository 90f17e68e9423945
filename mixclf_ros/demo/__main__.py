"""`python -m mixclf_ros.demo`: camera simulator + mixclf node + monitor (Ctrl-C: `mixclf_ros.interrupts`)."""
from mixclf_ros.interrupts import run

run("mixclf_ros.demo.launcher:main")
