"""The training plane: chip loaders, ViT encoders, self-supervised methods, pretraining."""
