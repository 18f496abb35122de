"""The self-contained HTML run report: one file, opens offline, no script.

- :func:`write_report`: one run's report (or several runs overlaid, with what differs).
- :func:`write_index`: a page listing every run under a runs directory, linking the reports.
- :func:`load_run`: what a report shows about one run directory, as data.
"""

from stoker.report.index import write_index
from stoker.report.load import RunData, load_run
from stoker.report.write import REPORT, write_report

__all__ = ["REPORT", "RunData", "load_run", "write_index", "write_report"]
