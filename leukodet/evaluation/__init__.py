"""Evaluation: matching, the seed's metrics, COCO AP, sweeps and reports."""
