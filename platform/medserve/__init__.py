"""medserve: audited, access-controlled serving of clinical AI models on Ray Serve."""

__version__ = "0.1.0"
