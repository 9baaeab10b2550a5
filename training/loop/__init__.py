"""The training loop: a stage's epochs, ranks, checkpoints, optimisers and schedules, precision, what rank 0
writes, run ids, and the sweep's grid of runs."""
