"""Talking to OCI registries: hosts configuration, authentication, the distribution API."""
