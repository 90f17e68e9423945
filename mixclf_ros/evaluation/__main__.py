"""`python -m mixclf_ros.evaluation ...`: the `mixclf-eval` command line."""

import sys

from mixclf_ros.evaluation.cli import main

sys.exit(main())
