"""Moving images between registries, the local stores and archives (containerd's transfer)."""
