"""The CRI plugin (Kubernetes runtime.v1): pod sandboxes, containers and their networking."""
