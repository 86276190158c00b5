"""Source datasets and webdataset shards (see sources.py and shards.py)."""
from .shards import (ShardError, decode_member, decode_pngs, decode_sample, describe_shard,
                     encode_png, load_image_split, read_manifest, read_records, sha256_file,
                     shard_paths, write_dataset, write_shards)
from .sources import (DataError, SourceData, Split, check_roles, list_splits, load_source,
                      load_source_from_params, read_idx, read_source, transform_images)

__all__ = [
    "DataError", "ShardError", "SourceData", "Split",
    "check_roles", "list_splits", "load_source", "load_source_from_params", "read_idx",
    "read_source", "transform_images",
    "decode_member", "decode_pngs", "decode_sample", "describe_shard", "encode_png",
    "load_image_split", "read_manifest", "read_records", "sha256_file", "shard_paths",
    "write_dataset", "write_shards",
]
