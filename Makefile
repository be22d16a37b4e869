# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?=
PYNETDICOM_APPS := echoscp echoscu findscu getscu movescu qrscp storescp storescu

.PHONY: run test install lint models clean

$(BIN)/dxgate: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The local CPU wheel first, so monai does not pull several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,triton,dev]'
	# pynetdicom installs its own storescu/echoscu/... scripts; remove them so dcmtk's stay first on PATH.
	for s in $(PYNETDICOM_APPS); do grep -qs pynetdicom $(BIN)/$$s && rm -f $(BIN)/$$s; done; true
	touch $@

install: $(BIN)/dxgate

run: install
	$(BIN)/dxgate serve $(if $(CONFIG),--config $(CONFIG),)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf var .pytest_cache
