"""Benchmarks: each compares the pipeline with the limit on the same machine in the same run (`make bench`)."""
