# ConKD: every target sets up the virtual environment on first use. One environment serves
# training, sweeps, the MLflow UI and the Optuna dashboard (SQLAlchemy 2 throughout).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.conkd-installed
RUN := outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)
# The sweeps' study storage that `make dashboard` opens (a database URL or a journal file).
STUDY_STORAGE ?= sqlite:///$(CURDIR)/mlruns/optuna.db

.PHONY: install demo test test-all lint ui dashboard

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip check
	touch $(STAMP)

## demo: train a ResNet-101 teacher, distil a ResNet-18 student (digits, CPU, about 16 minutes)
demo: $(STAMP)
	$(PY) train.py experiment=demo_teacher hydra.run.dir=$(RUN)/teacher
	$(PY) train.py experiment=demo_student hydra.run.dir=$(RUN)/student \
		teacher_ckpt=$(RUN)/teacher/checkpoints/best.pt
	@$(PY) -m conkd.summary $(RUN)/teacher $(RUN)/student

## test: the default (fast) suite
test: $(STAMP)
	$(PY) -m pytest -q

## test-all: including tests marked slow
test-all: $(STAMP)
	$(PY) -m pip check
	$(PY) -m pytest -q -m '' --durations=15

lint: $(STAMP)
	$(PY) -m ruff check conkd tests train.py eval.py hydra_plugins benchmarks experiments
	$(PY) -m ruff format --check conkd tests train.py eval.py hydra_plugins benchmarks experiments

## ui: the MLflow UI on the project's store, http://127.0.0.1:5000
ui: $(STAMP)
	$(PY) -c "from conkd.tracking import prepare_store as p, default_store as d; p(d('.')[0])"
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts --host 127.0.0.1 --port 5000 --workers 1

## dashboard: optuna-dashboard on the sweeps' studies, http://127.0.0.1:8080
dashboard: $(STAMP)
	$(VENV)/bin/optuna-dashboard $(STUDY_STORAGE) --host 127.0.0.1 --port 8080
