"""ctrctl: a docker-style command line for ctrd (and containerd)."""
