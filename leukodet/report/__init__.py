"""HTML reports people look at: one self-contained ``report.html`` per training/evaluation run and
per folder-inference output, plus the evaluation gallery the run page shows."""

from leukodet.report.gallery import write_gallery
from leukodet.report.html import write_inference_report, write_run_report

__all__ = ["write_gallery", "write_inference_report", "write_run_report"]
