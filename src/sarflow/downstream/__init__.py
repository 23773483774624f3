"""Downstream models on chips and embeddings: learning from label proportions (LLP) with bag
losses and kernel density matrices."""
