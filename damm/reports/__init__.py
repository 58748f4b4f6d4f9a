"""Operator views over the log and the read models: audit and the fleet report."""
