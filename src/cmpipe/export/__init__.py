"""Round trips with diffusers, and the generate command."""
