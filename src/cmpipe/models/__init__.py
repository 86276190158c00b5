"""The networks: the UNet factory and its files, and the teacher denoiser whatever its origin."""
