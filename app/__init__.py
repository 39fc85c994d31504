"""patchpack: any-resolution image embeddings with patch-n'-pack batching."""

__version__ = "0.1.0"
