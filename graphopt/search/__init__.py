"""Search over pass pipelines for a user's goal: ``graphopt.compress`` and its parts (goal, recipes,
sensitivity stage, trials, front, baselines, plots, report)."""
from graphopt.search.compress import CompressResult, compress
from graphopt.search.goal import Goal

__all__ = ["compress", "Goal", "CompressResult"]
