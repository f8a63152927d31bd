"""Text sources, streaming tokens split across hosts, the teacher cache store and its
chunk-order reader."""
