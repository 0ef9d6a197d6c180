"""``fasttune studio``: serve the local web app (``fasttune.studio``) until Ctrl-C.

Runs it started keep training after Ctrl-C (they are ``fasttune train`` processes of their own); a studio started
again on the same runs folder finds them.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860; 0 = any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs the token printed at start)")
    p.add_argument("--runs", default="runs", help="the folder of run folders (default ./runs, as fasttune train)")
    p.add_argument("--root", action="append", default=None, metavar="DIR",
                   help="a folder the file pickers may read (repeatable; default: the current folder)")
    p.add_argument("--max-upload-mb", type=int, default=512, help="largest dataset upload in MiB (default 512)")
    p.add_argument("--token", default=None,
                   help="the access token (default: none on 127.0.0.1, a random one on any other host)")


def studio_command(args: argparse.Namespace) -> int:
    from fasttune.config import ConfigError

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: {args.port} is not allowed; allowed: 0 to 65535")
    if args.max_upload_mb < 1:
        raise ConfigError(f"--max-upload-mb: {args.max_upload_mb} is not allowed; allowed: an integer >= 1")
    roots = [Path(r) for r in (args.root or ["."])]
    missing = [str(r) for r in roots if not r.expanduser().is_dir()]
    if missing:
        raise ConfigError(f"--root: {missing[0]!r} is not a folder; allowed: existing folders")
    from fasttune.studio import Studio, make_server
    from fasttune.studio.api import training_baseline

    studio = Studio(Path(args.runs), roots, args.host, args.token, args.max_upload_mb * 2**20)
    server = make_server(studio, args.port)
    # the estimate's runtime term: the RSS with the training stack imported, measured in the background before any
    # model is loaded in this process (requests that need it wait for it)
    threading.Thread(target=training_baseline, daemon=True).start()
    port = server.server_address[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{port}/" + (f"?token={studio.token}" if studio.token else "")
    print(f"fasttune studio: {url}\n  runs: {studio.runs.root}\n  files: "
          f"{', '.join(str(r) for r in studio.roots)}\n  Ctrl-C stops the server (runs keep training)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nfasttune studio: stopped", flush=True)
    finally:
        server.server_close()
    return 0
