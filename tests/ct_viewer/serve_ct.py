"""Serve a folder of graph JSON with circuit-tracer's own viewer and request handler (run with
the circuit-tracer venv's python): `python serve_ct.py DATA_DIR PORT`.

circuit-tracer's `serve()` binds every interface; this binds its CircuitGraphHandler and
frontend assets to 127.0.0.1 only. Prints "ready" once it accepts connections."""

import functools
import sys

from circuit_tracer.frontend.local_server import DEFAULT_FRONTEND_DIR, CircuitGraphHandler, ReusableTCPServer

data_dir, port = sys.argv[1], int(sys.argv[2])
handler = functools.partial(CircuitGraphHandler, frontend_dir=DEFAULT_FRONTEND_DIR, data_dir=data_dir)
with ReusableTCPServer(("127.0.0.1", port), handler) as httpd:
    print("ready", flush=True)
    httpd.serve_forever()
