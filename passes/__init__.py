"""Built-in passes. Importing this package registers them (it is graphopt's own plugin)."""
from graphopt.passes.dead_code import EliminateDeadCode
from graphopt.passes.distill import Distill
from graphopt.passes.fold_batchnorm import FoldBatchNorm
from graphopt.passes.low_rank import SplitLowRank
from graphopt.passes.remove_identity import RemoveIdentity

__all__ = ["FoldBatchNorm", "RemoveIdentity", "EliminateDeadCode", "Distill", "SplitLowRank"]
