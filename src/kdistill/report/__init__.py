"""Reports: a run directory as one self-contained HTML page plus a markdown summary (:func:`build_report`)."""

from kdistill.report.html import build_report

__all__ = ["build_report"]
