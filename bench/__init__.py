"""Benchmarks of ctrd against containerd; a folder of the repository, not of the package."""
