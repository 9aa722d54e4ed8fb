"""streamloc shard tools: metadata formats, geometry, shard writer/reader, storage."""
