"""The model: find the training run, download, load safely, read the training configuration."""
