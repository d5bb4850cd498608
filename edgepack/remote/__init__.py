"""Deploying bundles to devices: SSH transport, preflight, upload, install, smoke test, release switching."""
