"""Scoring predictions: the metric columns, AUROC with CIs, calibration, operating points, the Delta results
table, plots and HTML pages, the sweep's comparison, and other tools' label and prediction files."""
