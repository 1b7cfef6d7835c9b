"""Adapters to accelerate, DeepSpeed, transformers and PyTorch's post-local SGD.

Each module imports its library lazily: ``import extrap_accel`` needs only torch.
"""
