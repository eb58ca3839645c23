"""The command groups of the CLI, one module each (mirrors ``derive/jobs``); wired in ``derive.cli``."""
