"""HTTP routes, one module per responsibility."""
