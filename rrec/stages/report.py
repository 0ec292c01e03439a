"""`python -m rrec.stages.report` (DVC stage `report`): the comparison of every method (`reports/comparison.md`, `.csv`)."""

from rrec.report import run_report
from rrec.stages import run

if __name__ == "__main__":
    run("report", run_report)
