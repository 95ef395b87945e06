"""Retrieval with a robust perceptual encoder: sources, on-disk index, search, classification (percept retrieve)."""
