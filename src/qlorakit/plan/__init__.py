"""The memory planner command: ``qlorakit plan``."""
