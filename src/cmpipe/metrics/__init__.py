"""Image-quality metrics: FID and KID with clean-fid's Inception, and LPIPS."""
