"""Local `evaluate` module folder: load `accuracy.py` with `evaluate.load(<path>)`."""
