# The two README commands: `make demo` (whole pipeline on generated data) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export SPARK_LOCAL_IP := 127.0.0.1
export PYSPARK_PYTHON := $(BIN)/python
export PYSPARK_DRIVER_PYTHON := $(BIN)/python
NP ?= 2

.PHONY: install demo demo-data etl train results test bench bench-scale bench-pneumonia clean compose-demo

install:
	bash install/setup_env.sh

demo: install demo-data etl train results

demo-data:
	@test -f demo_data/nih/Data_Entry_2017.csv || python -m etl.demo_data --output demo_data/nih

etl:
	time spark-submit --master 'local[2]' etl/preprocess.py --config conf/demo.yaml

train:
	time horovodrun -np $(NP) -H localhost:$(NP) python training/train.py --config conf/demo.yaml

results:
	python -m training.show_results --table outputs/demo/results_delta --history

test: install
	time python -m pytest tests -ra

bench: install
	python -m benchmarks.run

# Scale benchmark (benchmarks/scale.py): 20,000 NIH-sized images through the ETL (local[2]) and the loader (2 and 4
# ranks), driver-only probes at 112,120 and 1,000,000 rows; 8 min on 2 free cores, 14 with other work on them.
bench-scale: install
	time python -m benchmarks.scale

clean:
	rm -rf outputs demo_data

# Quality benchmark (README "Pneumonia"): real pediatric pneumonia train split, from scratch, 2 CPU cores.
bench-pneumonia: install
	time spark-submit --master 'local[2]' etl/preprocess.py --config conf/kermany.yaml
	time python training/train.py --config conf/kermany.yaml --backend single

# docker-compose.yml's trainer runs this: the demo on the compose cluster. The ETL's executors run on spark-worker
# (the driver in the trainer advertises and binds the trainer's hostname), and every file goes under the `outputs`
# volume, which the worker and the trainer both mount at /outputs: the executors' Parquet files are the driver's.
# The worker offers 2 cores and 8g: one executor with both cores and 4g fits it.
compose-demo: COMPOSE_OUT = /outputs
compose-demo: COMPOSE_MASTER = spark://spark-master:7077
compose-demo: COMPOSE_DRIVER_HOST = trainer
compose-demo: export SPARK_LOCAL_IP = $(COMPOSE_DRIVER_HOST)
compose-demo:
	@test -f $(COMPOSE_OUT)/demo_data/nih/Data_Entry_2017.csv || python -m etl.demo_data --output $(COMPOSE_OUT)/demo_data/nih
	time spark-submit --master $(COMPOSE_MASTER) --conf spark.driver.host=$(COMPOSE_DRIVER_HOST) \
	    --conf spark.executor.cores=2 --conf spark.executor.memory=4g --conf spark.cores.max=2 \
	    etl/preprocess.py --config conf/demo.yaml --data-root $(COMPOSE_OUT)/demo_data/nih --output $(COMPOSE_OUT)/demo/nih_128
	time horovodrun -np $(NP) -H localhost:$(NP) python training/train.py --config conf/demo.yaml \
	    --dataset $(COMPOSE_OUT)/demo/nih_128 --output-dir $(COMPOSE_OUT)/demo/runs \
	    --results-table $(COMPOSE_OUT)/demo/results_delta
	python -m training.show_results --table $(COMPOSE_OUT)/demo/results_delta --history
