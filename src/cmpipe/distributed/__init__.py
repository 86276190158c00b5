"""Running on several processes and devices: DDP helpers, accelerator settings, device choice."""
