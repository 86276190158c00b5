"""Small helpers shared by the whole package: atomic writes, content hashes, seeded generators."""
