"""Write the reports of existing outputs and print their paths:

    python -m leukodet.report --run outputs/demo --infer outputs/demo/infer
"""

from __future__ import annotations

import argparse
import logging

from leukodet.report.html import write_inference_report, write_run_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m leukodet.report", description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a training run directory (config.yaml, <split>_metrics.csv, ...)")
    parser.add_argument("--split", default="test", help="the evaluated split to show (default: test)")
    parser.add_argument("--eval-dir", help="where tools/evaluate.py wrote that split's files (default: --run)")
    parser.add_argument("--infer", help="a tools/infer.py output folder (counts.csv, run.json, ...)")
    args = parser.parse_args(argv)
    if not (args.run or args.infer):
        parser.error("give --run and/or --infer")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.run:
        print(f"run report: {write_run_report(args.run, args.split, args.eval_dir)}")
    if args.infer:
        print(f"inference report: {write_inference_report(args.infer)}")


if __name__ == "__main__":
    main()
