"""Spark ETL: chest X-ray downloads -> Parquet partitioned by patient-level split. Never imports torch."""
