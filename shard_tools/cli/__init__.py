"""One module per ``python -m shard_tools`` command (thin: parse args, call the library)."""
