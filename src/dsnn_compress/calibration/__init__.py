"""Calibration: run a model on audio to score weights (activation statistics) and to measure block sensitivity."""
