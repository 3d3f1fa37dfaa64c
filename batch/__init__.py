"""motion-dials-batch: queue parameter sweeps of a ComfyUI workflow on one or more servers through the HTTP API.

Importable without ComfyUI (it only talks to running servers) and not loaded by the node pack.
"""
