"""A trained model in use: the one prediction schema, a checkpoint loaded to score images, prediction rows in
Delta, the MLflow model, and the MLflow run of a training run."""
