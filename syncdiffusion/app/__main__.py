"""`python -m syncdiffusion.app [--weights DIR] [--model NAME] [--host HOST] [--port N]`: serve the
web app and print its URL.

The default output folder is a new temporary one, removed (with the panoramas in it) when the
app stops, by Ctrl-C or SIGTERM; a folder given with --output-dir is the user's: what the app
made stays there."""

from __future__ import annotations

import argparse
import errno
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models.weights import DOWNLOAD_COMMAND, default_model, default_weights_dir
from .form import model_folders
from .jobs import JobQueue
from .server import App, AppServer


def build_parser() -> argparse.ArgumentParser:
    """The app's options."""
    parser = argparse.ArgumentParser(
        prog="python -m syncdiffusion.app",
        description="Serve a web page to make SyncDiffusion panoramas on this machine's GPU.",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights folder; each folder in it with a model_index.json is a model to pick, each "
        "in its controlnet/ a ControlNet (default: $SYNCDIFFUSION_WEIGHTS or weights/)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the model picked at first (default: $SYNCDIFFUSION_MODEL or stable-diffusion-2-base)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; ::1 the same over "
        "IPv6; 0.0.0.0 or :: opens the app to every machine that can reach this one, with no "
        "password). Whatever the address, a request must name the app by an IP address, "
        "localhost, this machine's name or an --allowed-host, so that no web site reaches it "
        "by DNS rebinding",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name the app is reached by (a DNS or mDNS name of this machine, a "
        "proxy's), besides IP addresses, localhost and this machine's name; may be repeated",
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860; 0: any free)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="folder for the panoramas made, which stay there (default: a new temporary "
        "folder, removed with its panoramas when the app stops)",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument(
        "--abandon-after",
        type=float,
        default=10.0,
        help="seconds a job runs on or waits in line once no browser tab follows it (default: 10)",
    )
    return parser


def loader(weights_dir: Path, device: str | None) -> Callable[[str, str | None], Any]:
    """The pipeline of a model folder in `weights_dir` with a ControlNet folder of its
    controlnet/ (or none), loaded when a job first needs it."""

    def load(model: str, controlnet: str | None) -> Any:
        from ..pipeline import SyncDiffusionPipeline

        pipe = SyncDiffusionPipeline.from_pretrained(
            weights_dir, device=device, model=model, controlnet=controlnet
        )
        # The page names a LoRA of the hub, an https URL or a file of the weights folder's
        # lora/, never another file of this machine: the app may be served beyond it.
        pipe.lora_local_files = False
        return pipe

    return load


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted; returns the process exit status."""
    args = build_parser().parse_args(argv)
    weights_dir = args.weights or default_weights_dir()
    models = model_folders(weights_dir)
    if not models:
        print(
            f"error: no model folder (one holding model_index.json) in {weights_dir}; "
            f"download one with `{DOWNLOAD_COMMAND}` or name the folder with --weights",
            file=sys.stderr,
        )
        return 2
    model = args.model or default_model()
    if model not in models:
        if args.model:
            print(f"error: --model {model!r} is not among {', '.join(models)}", file=sys.stderr)
            return 2
        model = models[0]
    temporary = args.output_dir is None
    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="syncdiffusion-app-"))
    # SIGTERM (a service manager's stop, `kill`) ends it as Ctrl-C does: the folder goes too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        jobs = JobQueue(loader(weights_dir, args.device), output_dir, args.abandon_after)
        app = App(weights_dir, model, jobs)
        try:
            server = AppServer((args.host, args.port), app, allowed_hosts=args.allowed_host)
        except OSError as error:
            print(f"error: {cannot_listen(args.host, args.port, error)}", file=sys.stderr)
            return 2
        kept = ", a temporary folder removed when the app stops" if temporary else ""
        try:
            print(
                f"SyncDiffusion app: {server.url}  (panoramas go to {output_dir}{kept})", flush=True
            )
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    finally:
        if temporary:
            shutil.rmtree(output_dir, ignore_errors=True)
    return 0


def cannot_listen(host: str, port: int, error: OSError) -> str:
    """One line on why the app cannot listen on `host` port `port`, naming the option to fix."""
    why = " ".join(str(error.strerror or error).split())
    if error.errno == errno.EADDRINUSE:
        fix = "another program listens there: pick another with --port (0: any free)"
    elif error.errno == errno.EACCES:
        fix = "ports below 1024 need privileges: pick another with --port"
    else:
        fix = "--host must be an address of this machine (127.0.0.1, ::1, 0.0.0.0, ::)"
    return f"cannot listen on {host} port {port} ({why}); {fix}"


if __name__ == "__main__":
    sys.exit(main())
