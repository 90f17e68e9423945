"""`python -m mixclf_ros.demo`: camera simulator + mixclf node + monitor."""
import sys

from mixclf_ros.demo.launcher import main

sys.exit(main())
