"""Embeddings and labels as features: the offline Parquet sources, the Feast repository,
streaming materialization, online lookups and similarity search."""
