"""The evaluation command: ``qlorakit eval``."""
