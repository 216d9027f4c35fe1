"""Local `evaluate` module folder: load `continual.py` with `evaluate.load(<path>)`."""
