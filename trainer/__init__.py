"""Models and optimisation: the token/attention-sparse timm ViT and the streaming training loop.

Filled in by the trainer issue; present now so the package layout of DESIGN.md holds.
"""
