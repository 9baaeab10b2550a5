"""Reading the ETL's Parquet into batches: the reader, each rank's share, the input transform, augmentation,
sampling, label targets."""
