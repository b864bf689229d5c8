"""Evaluation: safety and over-refusal suites, judges, capability, statistics and tables."""
