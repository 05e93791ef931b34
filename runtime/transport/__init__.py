"""Stage-to-stage transport of a pipeline group: frames over TCP (a JSON header and raw tensor
bytes, never pickle) on links both ends proved with the group's secret (a handshake before the
first frame), the inner stages' serving loop and the head's group executor."""
