"""Build and deploy stages: one module each, one entry function each."""
