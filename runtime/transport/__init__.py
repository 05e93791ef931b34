"""Stage-to-stage transport of a pipeline group: frames over TCP (a JSON header and raw tensor
bytes, never pickle), the inner stages' serving loop and the head's group executor."""
