"""Distributed PyTorch training on the ETL's Parquet (Petastorm + Horovod or torch.distributed). Never imports Spark."""
