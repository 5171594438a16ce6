# The two quick-start commands: `make demo` (main job on generated sample data) and `make test`.
PYTHON ?= python3
DEMO_RUN ?= outputs/demo

.PHONY: install demo test test-long test-all

install:
	$(PYTHON) -m pip install -q -e ".[test,slides]"

# Train (a second `make demo` resumes the same run), evaluate on the test split, then run
# inference over the sample's images as a lab would over a folder.
demo: install
	$(PYTHON) tools/train.py train.run_dir=$(DEMO_RUN)
	$(PYTHON) tools/infer.py ckpt=$(DEMO_RUN)/checkpoints/best.ckpt input=datasets/sample/wbc/images \
		infer.out_dir=$(DEMO_RUN)/infer
	@echo "run report:       $(DEMO_RUN)/report.html"
	@echo "inference report: $(DEMO_RUN)/infer/report.html"

test: install
	lint-imports
	$(PYTHON) -m pytest

# End-to-end runs of 25 s or more, kept out of `make test` so it stays under ~10 minutes; CI runs both.
test-long: install
	$(PYTHON) -m pytest -m "long and not slow"

test-all: install
	$(PYTHON) -m pytest -m "slow or not slow"
