"""The data plane: catalog -> ingest -> grid -> tile -> the chip store (and its one reader),
synthetic scenes, object storage, DVC versions. It imports no other room of sarflow."""
