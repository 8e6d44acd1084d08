"""Microbenchmarks of rlfuse's ops: time, roofline (bytes, FLOPs, % of the measured device ceiling) and peak memory."""
