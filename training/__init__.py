"""Distributed PyTorch training on the ETL's Parquet (Petastorm + Horovod or torch.distributed). Never imports Spark.

The modules here are the commands (train, predict, evaluate, ensemble, report, show_results, sweep, filters,
localisation, monitor); what they are made of lives in the rooms below: data/, models/, explain/, loop/,
evaluation/ and serving/ (README, "Layout", says which file does what and where a change goes)."""
