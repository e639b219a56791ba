"""Built-in passes. Importing this package registers them (it is graphopt's own plugin)."""
from graphopt.passes.bias_correction import BiasCorrection
from graphopt.passes.dead_code import EliminateDeadCode
from graphopt.passes.distill import Distill
from graphopt.passes.equalize import CrossLayerEqualization
from graphopt.passes.fold_batchnorm import FoldBatchNorm
from graphopt.passes.fold_qdq import FoldQDQ
from graphopt.passes.insert_qdq import InsertQDQ
from graphopt.passes.remove_identity import RemoveIdentity

__all__ = ["FoldBatchNorm", "RemoveIdentity", "EliminateDeadCode", "Distill", "InsertQDQ", "FoldQDQ",
           "CrossLayerEqualization", "BiasCorrection"]
