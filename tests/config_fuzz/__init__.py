"""The config fuzz (``tests/test_config_fuzz*.py``): every public config class, its fields, the
values drawn for them (``specs.py``, ``values.py``) and a tiny run per class (``runs.py``)."""
