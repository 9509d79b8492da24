"""The algorithm, as plain functions over tensors and callables: the windows, the sync schedule
and step, the sampling loop, chunking and out-of-memory halving, recomputation, the precision
policy, decoding, and a ControlNet over the panorama. Nothing here reads files or requests."""
