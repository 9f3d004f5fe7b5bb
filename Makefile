# ConKD: every target sets up its own virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.conkd-installed
# The MLflow server/UI gets its own small environment: the training environment pins
# SQLAlchemy < 2 for optuna 2.10 (hydra-optuna-sweeper), and MLflow 3.17's server needs 2.x.
UI_VENV ?= .venv-ui
UI_STAMP := $(UI_VENV)/.conkd-installed
MLFLOW_VERSION = $(shell $(PY) -c "import mlflow; print(mlflow.__version__)")
RUN := outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)

.PHONY: install demo test test-all lint ui

install: $(STAMP) $(UI_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

$(UI_STAMP): $(STAMP)
	test -x $(UI_VENV)/bin/python || python3 -m venv $(UI_VENV)
	$(UI_VENV)/bin/python -m pip install 'mlflow==$(MLFLOW_VERSION)' psycopg2-binary
	touch $(UI_STAMP)

## demo: train a ResNet-101 teacher, distil a ResNet-18 student (digits, CPU, a few minutes)
demo: $(STAMP)
	$(PY) train.py experiment=demo_teacher hydra.run.dir=$(RUN)/teacher
	$(PY) train.py experiment=demo_student hydra.run.dir=$(RUN)/student \
		teacher_ckpt=$(RUN)/teacher/checkpoints/best.pt
	@$(PY) -m conkd.summary $(RUN)/teacher $(RUN)/student

## test: the default (fast) suite
test: $(STAMP) $(UI_STAMP)
	$(PY) -m pytest -q

## test-all: including tests marked slow
test-all: $(STAMP) $(UI_STAMP)
	$(PY) -m pytest -q -m '' --durations=15

lint: $(STAMP)
	$(PY) -m ruff check conkd tests train.py eval.py hydra_plugins benchmarks experiments
	$(PY) -m ruff format --check conkd tests train.py eval.py hydra_plugins benchmarks experiments

## ui: the MLflow UI on the project's store, http://127.0.0.1:5000
ui: $(UI_STAMP)
	$(PY) -c "from conkd.tracking import prepare_store as p, default_store as d; p(d('.')[0])"
	$(UI_VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts --host 127.0.0.1 --port 5000 --workers 1
