"""`medserve bench`: load generation and the side-by-side performance run."""
