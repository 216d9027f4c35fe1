"""``Trainer`` subclasses, one ``<method>_config.py`` + ``<method>_trainer.py`` pair per method."""
