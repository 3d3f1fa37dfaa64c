"""`make serve`: the host ComfyUI with this pack on 127.0.0.1, tiny models and test fixture included."""

from __future__ import annotations

import argparse
import time

from .host import Server


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8188)
    args = parser.parse_args()
    server = Server(port=args.port).start()
    print(f"ComfyUI with Motion Dials: {server.url}  (log: {server.log_path}; Ctrl-C stops it)", flush=True)
    try:
        while server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
