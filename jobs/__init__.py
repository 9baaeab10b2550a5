"""Cluster jobs: batch scoring on Spark (`score.py`, `cxr-score`) and TorchDistributor training on
Databricks (`train_distributor.py`); the bundle's tasks are in cxr_jobs.yml."""
