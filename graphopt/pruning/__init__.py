"""Structured pruning machinery: channel dependency groups (which tensor axes must shrink
together) found by rules registered per module type and op, the channel-space algebra under
them, and physical slicing of weights. ``channel_rule`` is how a user teaches the analysis
their own layer."""
from graphopt.pruning.channels import ChannelAnalysis, channel_groups
from graphopt.pruning.groups import (DEPTHWISE, EMBED, HEADS, IN, NORM, OUT, PARAM, ChannelGroup, ChannelPlan,
                                     Member)
from graphopt.pruning.rules import ChannelRuleError, channel_rule, strict_rules
from graphopt.pruning.spaces import Layout, Seg, Unaligned

__all__ = ["ChannelAnalysis", "ChannelGroup", "ChannelPlan", "ChannelRuleError", "Layout", "Member", "Seg",
           "Unaligned", "channel_groups", "channel_rule", "strict_rules",
           "DEPTHWISE", "EMBED", "HEADS", "IN", "NORM", "OUT", "PARAM"]
