"""Built-in passes. Importing this package registers them (it is graphopt's own plugin)."""
from graphopt.passes.adaround import AdaRound
from graphopt.passes.bias_correction import BiasCorrection
from graphopt.passes.binarize import Binarize, FreezeBinary
from graphopt.passes.eliminate_dead_code import EliminateDeadCode
from graphopt.passes.distill import Distill
from graphopt.passes.cross_layer_equalization import CrossLayerEqualization
from graphopt.passes.fold_batchnorm import FoldBatchNorm
from graphopt.passes.fold_qdq import FoldQDQ
from graphopt.passes.insert_qdq import InsertQDQ
from graphopt.passes.split_low_rank import SplitLowRank
from graphopt.passes.prune_magnitude import PruneMagnitude
from graphopt.passes.prune_channels import PruneChannels
from graphopt.passes.qat import QAT
from graphopt.passes.quantize_weights import QuantizeWeights
from graphopt.passes.remove_identity import RemoveIdentity
from graphopt.passes.share_weights import ShareWeights
from graphopt.passes.sparsify_channels import SparsifyChannels

__all__ = ["FoldBatchNorm", "RemoveIdentity", "EliminateDeadCode", "Distill", "PruneChannels", "Binarize",
           "FreezeBinary", "PruneMagnitude", "ShareWeights", "QuantizeWeights", "SplitLowRank", "InsertQDQ",
           "FoldQDQ", "CrossLayerEqualization", "BiasCorrection", "QAT", "SparsifyChannels", "AdaRound"]
