"""How samples are stored on disk: the sharded memory-mapped format (`shard_store`) shared by the feature cache and
the decode-once image store (`image_store`), JPEG decoding (`decode`) and augmentation of stored pixels on the
training device (`device_augment`)."""
