"""Structured pruning machinery: channel dependency groups (which tensor axes must shrink
together), the channel-space algebra under them, and physical slicing of weights."""
