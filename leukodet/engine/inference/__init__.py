"""Inference on a folder of smear images: overlays, per-image counts, per-detection results, a
per-folder summary and a VIA project to correct.

discovery  the images under the input, and their names relative to it
store      the resume store: ``run.json`` and one record (+ overlay) per image done
writers    one small writer per folder-wide output file, fed record by record
run        ``run_inference``: the predict loop, then one pass over the records through the writers
"""

from leukodet.engine.inference.run import InferenceSummary, run_inference

__all__ = ["InferenceSummary", "run_inference"]
