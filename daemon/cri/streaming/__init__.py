"""CRI's streaming server: the URLs Exec, Attach and PortForward hand back, served over
WebSocket or SPDY/3.1 as kubelet and kubectl speak them."""
