"""Pretrained weights the metrics need (Inception for FID, LPIPS backbones), found offline first."""
