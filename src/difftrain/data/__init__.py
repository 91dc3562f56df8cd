"""Image folders with captions -> training tensors."""
