"""Source datasets and webdataset shards (readers in sources.py, shards.py, manifest.py)."""
from cmpipe.data.base import DataError, ShardError, SourceData, Split
from cmpipe.data.manifest import load_image_split, read_manifest, shard_paths, write_dataset
from cmpipe.data.png import decode_pngs, encode_png
from cmpipe.data.shards import (
    decode_member,
    decode_sample,
    describe_shard,
    read_records,
    write_shards,
)
from cmpipe.data.sources import (
    check_roles,
    list_splits,
    load_source,
    load_source_from_params,
    read_idx,
    read_source,
)
from cmpipe.data.transforms import transform_images
from cmpipe.util.hashing import sha256_file

__all__ = [
    "DataError", "ShardError", "SourceData", "Split",
    "check_roles", "list_splits", "load_source", "load_source_from_params", "read_idx",
    "read_source", "transform_images",
    "decode_member", "decode_pngs", "decode_sample", "describe_shard", "encode_png",
    "load_image_split", "read_manifest", "read_records", "sha256_file", "shard_paths",
    "write_dataset", "write_shards",
]
