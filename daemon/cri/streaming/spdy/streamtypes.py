"""Names shared by the two protocols served over SPDY."""
from __future__ import annotations

# remotecommand and portforward stream types and headers (lower case: SPDY/3's rule).
STREAM_TYPE = "streamtype"
ERROR = "error"
STDIN = "stdin"
STDOUT = "stdout"
STDERR = "stderr"
RESIZE = "resize"
DATA = "data"
PORT = "port"
REQUEST_ID = "requestid"
