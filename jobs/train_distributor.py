"""Run training/train.py on a Spark cluster with TorchDistributor.

Databricks deprecated HorovodRunner after Runtime 15.4 LTS ML and recommends
`pyspark.ml.torch.distributor.TorchDistributor`: it starts `torchrun` on the cluster's
workers (or on the driver with --local-mode), so train.py runs with its torch.distributed
backend, exactly as under a local `torchrun`.

    python jobs/train_distributor.py --num-processes 8 --use-gpu -- --config conf/nih.yaml --dataset /Volumes/...
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train.py"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2, help="training processes (GPUs with --use-gpu)")
    parser.add_argument("--local-mode", action="store_true", help="run the processes on the driver node")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per process (NCCL)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for training/train.py, after --")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args

    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("cxr-train")
    if "PYSPARK_GATEWAY_PORT" not in os.environ and "DATABRICKS_RUNTIME_VERSION" not in os.environ:
        builder = builder.master("local[*]")
    builder.getOrCreate()
    distributor = TorchDistributor(num_processes=args.num_processes, local_mode=args.local_mode,
                                   use_gpu=args.use_gpu)
    distributor.run(str(TRAIN_SCRIPT), *train_args)


if __name__ == "__main__":
    main()
