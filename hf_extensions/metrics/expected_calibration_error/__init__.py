"""Local `evaluate` module folder: load `expected_calibration_error.py` with `evaluate.load(<path>)`."""
