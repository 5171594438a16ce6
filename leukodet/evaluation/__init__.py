"""Evaluation: the figures of docs/metrics.md, and threshold sweeps.

matching   one-to-one matching (``match_image``, ``match_points``) and the confusion-matrix ``Tally``
metrics    ``evaluate`` / ``Evaluator`` -> ``EvaluationResult``; ``evaluate_by_source`` (a row per
           acquisition); ``to_rle_predictions``; named metrics in
           ``registry.METRICS``
coco_eval  COCO AP50 and AP50:95 through pycocotools, maxDets >= 300
sweep      ``refilter`` cached raw predictions (``save_raw`` / ``load_raw``), ``sweep`` a grid,
           ``save_thresholds`` / ``load_thresholds``, ``plot_heatmap``
counts     ``count_table``: the RBC paper's per-image count accuracy at several min confidences, from the cache
report     printed table, CSV/JSON, confusion-matrix and PR-curve PNGs
"""
