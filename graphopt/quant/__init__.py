"""Quantization machinery: quantization parameters and int8 arithmetic, deployment targets,
calibration observers, binary layers, and the weight-compression mechanics (low-bit codes,
shared codebooks, sparse masks) the weight passes and the packed format share."""
