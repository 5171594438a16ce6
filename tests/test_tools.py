"""The command-line tools, run as a user runs them (subprocess, Hydra overrides)."""

import os
import subprocess
import sys
import textwrap

from conftest import REPO


def run_tool(*args, cwd=REPO):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_make_sample_prepare_show_and_preview(tmp_path):
    data = tmp_path / "sample"
    common = [f"data.root={data}", f"paths.output_dir={tmp_path / 'outputs'}"]
    out = run_tool(REPO / "tools/make_sample.py", *common, "data.generate.n_images=12", "data.generate.seed=3")
    assert "12 images" in out and (data / "via_region_data.json").is_file()
    out = run_tool(REPO / "tools/prepare.py", *common)
    assert "prepared 12 images" in out and "results saved to" in out
    assert {p.name for p in (data / "prepared").iterdir()} >= {"train.json", "val.json", "test.json", "summary.csv",
                                                              "skipped.csv"}
    out = run_tool(REPO / "tools/show_dataset.py", *common, "split=val", "+limit=2")
    assert "2 images of sample_wbc_val drawn" in out
    assert len(list((tmp_path / "outputs").rglob("annotations/sample_wbc_val/*.jpg"))) == 2
    out = run_tool(REPO / "tools/preview.py", *common, "+exp=segmented", "+n=2")
    assert "2 of 2 panels" in out and len(list((tmp_path / "outputs").rglob("preview/*_steps.jpg"))) == 2


def test_bad_config_names_key_value_and_choices(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "tools/prepare.py"), "data=nonexistent"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "data" in done.stderr and "nonexistent" in done.stderr and "sample_wbc" in done.stderr


def test_wrong_type_names_the_key(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "tools/train.py"), "train.max_steps=many"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "train.max_steps" in done.stderr and "many" in done.stderr


def test_known_errors_are_one_line_with_exit_status_2(tmp_path):
    missing = tmp_path / "nowhere" / "best.ckpt"
    done = subprocess.run([sys.executable, str(REPO / "tools/evaluate.py"), f"ckpt={missing}",
                           f"paths.output_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {missing}: no such checkpoint file") and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, str(REPO / "tools/make_sample.py"), "data=bccd",
                           f"hydra.run.dir={tmp_path / 'run2'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "data=bccd has no 'generate' block" in done.stderr


def test_an_installed_plugin_step_trains_from_yaml_through_the_tool(tmp_path):
    """A throwaway distribution whose entry point registers a preprocessing step; a YAML file names
    the step; tools/train.py loads the plugin at start and every image goes through the step."""
    plugin = tmp_path / "site"
    plugin.mkdir()
    (plugin / "leukodet_marker_plugin.py").write_text(textwrap.dedent("""
        from pathlib import Path

        from leukodet.preprocess import step

        @step("count_marker")
        def count_marker(state, path):
            with open(path, "a") as out:
                out.write("x")
            return state
    """))
    dist = plugin / "leukodet_marker_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: leukodet-marker-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[leukodet.plugins]\nmarker = leukodet_marker_plugin\n")
    marker = tmp_path / "marker.txt"
    (tmp_path / "conf" / "preprocess").mkdir(parents=True)
    (tmp_path / "conf" / "preprocess" / "with_marker.yaml").write_text(
        f"scale: 1.0\nsteps:\n  - {{name: scale, factor: 1.0}}\n  - {{name: count_marker, path: '{marker}'}}\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "tools/train.py"), f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
         "preprocess=with_marker", f"data.root={tmp_path / 'data'}", "data.generate.n_images=8",
         "+data.generate.width=192", "+data.generate.height=160", "data.prepare.group_regex=null",
         "train.max_steps=1", "train.steps_per_epoch=1", "train.warmup_steps=1", "train.num_workers=0",
         "model.min_size=160", "model.max_size=192", "model.weights=none", f"train.run_dir={tmp_path / 'run'}",
         f"paths.output_dir={tmp_path / 'out'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(plugin)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert len(marker.read_text()) >= 3  # training, validation and test images all went through the step
    assert "count_marker" in (tmp_path / "run" / "config.yaml").read_text()
