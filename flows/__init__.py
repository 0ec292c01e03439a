"""Prefect flows over the rrec stages.

Prefect's server sends usage telemetry by default; on a machine without internet that
prints an error at every start, so every server this project starts has it off (set
PREFECT_SERVER_ANALYTICS_ENABLED to turn it back on)."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
