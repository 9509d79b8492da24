"""Command line: `python -m syncdiffusion --prompt "..." --output pano.png [--weights DIR]`,
or `python -m syncdiffusion --from-png pano.png` to make a saved panorama again; with
`--controlnet NAME --control-image LAYOUT.png`, a panorama laid out by a condition image."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..core.chunks import RECOMPUTE_MODES
from ..core.control import image_record
from ..core.sphere import FACES, cube_map, is_sphere
from ..core.windows import Geometry
from ..errors import InputError, WeightsError, one_line
from ..pipeline import SyncDiffusionPipeline
from ..request.condition_image import (
    CONTROL_PREPROCESSORS,
    open_control_image,
    open_image,
    preprocess,
)
from ..request.image_file import (
    TEMPORARY,
    model_identity,
    read_parameters,
    save_image,
    whole_file,
)
from ..request.inputs import (
    CONTROL_INPUTS,
    LORA_INPUTS,
    OUTPUT_INPUTS,
    Input,
    check_output,
    panorama_inputs,
)

SUFFIX_FORMATS = {".png": "png", ".webp": "webp", ".jpg": "jpg", ".jpeg": "jpg"}
# SD2-base's; those that follow a model's window say so. The image and mask are files.
INPUTS = {name: spec for name, spec in panorama_inputs().items() if spec.type is not Image.Image}
IMAGE_FILES = {name: spec for name, spec in panorama_inputs().items() if spec.type is Image.Image}
# The ControlNet's numbers; its condition image is --control-image, a file.
CONTROL_NUMBERS = {name: spec for name, spec in CONTROL_INPUTS.items() if spec.type is float}


def _default(spec: Input) -> str:
    """The default, as `--help` says it; where it follows the model's window, how."""
    sdxl = panorama_inputs(Geometry(window=128)).get(spec.name, spec)
    if sdxl.default == spec.default:
        return f"default: {spec.default!r}"
    return f"default: {spec.default!r}; {sdxl.default!r} on SDXL, as it follows the window"


def _option_type(spec: Input):
    """argparse's `type` for an input: its text read by `Input.parse`, whose refusal (naming the
    input, the text and what is allowed) becomes argparse's error for the option."""

    def parse(text: str):
        try:
            return spec.parse(text)
        except InputError as error:
            follows = panorama_inputs(Geometry(window=128)).get(spec.name, spec) != spec
            note = " (SD2-base's bounds; they follow the model's window)" if follows else ""
            raise argparse.ArgumentTypeError(f"{error}{note}") from None

    parse.__name__ = spec.type.__name__  # how argparse names the type
    return parse


def build_parser() -> argparse.ArgumentParser:
    """Every panorama input as `--input-name`, from the library's description of the inputs."""
    parser = argparse.ArgumentParser(
        prog="python -m syncdiffusion",
        description="Make a coherent panorama with SyncDiffusion on Stable Diffusion "
        "(2.0-base unless --model names another SD 1.x/2.x or SDXL folder).",
    )
    # Inputs not given stay None: the model's defaults (or the --from-png file's) fill them in.
    for spec in (*INPUTS.values(), *CONTROL_NUMBERS.values()):
        flag = "--" + spec.name.replace("_", "-")
        if spec.required:
            parser.add_argument(
                flag, type=_option_type(spec), help=f"{spec.help} Required without --from-png."
            )
        elif spec.type is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, help=f"{spec.help} ({_default(spec)})"
            )
        else:
            parser.add_argument(
                flag, type=_option_type(spec), help=f"{spec.help} ({_default(spec)})"
            )
    parser.add_argument(
        "--from-png",
        type=Path,
        default=None,
        metavar="FILE",
        help="take every input from a panorama this tool made (options given here override)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("panorama.png"),
        help="file to write: .png, .webp or .jpg (default: panorama.png)",
    )
    quality = OUTPUT_INPUTS["output_quality"]
    parser.add_argument(
        "--output-quality",
        type=_option_type(quality),
        default=quality.default,
        help=f"{quality.help} ({_default(quality)})",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights folder (default: $SYNCDIFFUSION_WEIGHTS or weights/)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model folder in the weights folder, e.g. stable-diffusion-xl-base-1.0 (default: "
        "$SYNCDIFFUSION_MODEL or stable-diffusion-2-base); sides and stride follow its window",
    )
    parser.add_argument(
        "--controlnet",
        default=None,
        metavar="NAME",
        help="lay the panorama out with this ControlNet, a folder in the weights folder's "
        "controlnet/ (scripts/download_weights.py --controlnet NAME fetches it); needs "
        "--control-image",
    )
    parser.add_argument(
        "--control-image",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"{CONTROL_INPUTS['control_image'].help} A PNG, JPEG or WebP file.",
    )
    for name, spec in IMAGE_FILES.items():
        parser.add_argument(
            "--" + name,
            type=Path,
            default=None,
            metavar="FILE",
            help=f"{spec.help} A PNG, JPEG or WebP file.",
        )
    parser.add_argument(
        "--control-preprocess",
        choices=CONTROL_PREPROCESSORS,
        default=None,
        help="what to make of --control-image first: canny turns a photo into its edges (for "
        "a canny ControlNet); none uses it as given (default: none)",
    )
    parser.add_argument(
        "--cubemap",
        action="store_true",
        help="also write the whole sphere's six cube faces beside --output, as NAME-px.png, "
        "-nx, -py, -ny, -pz, -nz (three.js and OpenGL order, +y up), each a quarter of the "
        "width square; needs --loop-closure and a height of half the width",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument(
        "--view-batch-size",
        type=int,
        default=None,
        help="windows per network call (default: as many as fit in memory)",
    )
    parser.add_argument(
        "--recompute",
        choices=RECOMPUTE_MODES,
        default="auto",
        help="the sync backward's activations: recomputed (always), kept (never), or kept "
        "where they fit and recomputed where not (auto, the default); the same picture",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, with the inputs saved in `--from-png FILE` as defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.from_file = []  # the inputs the --from-png file gave, to check once the model is known
    if args.from_png is not None:
        try:
            saved = read_parameters(args.from_png)
        except ValueError as error:
            parser.exit(2, f"error: --from-png: {error}\n")
        # Set as they were saved, not through argparse's `type`: the model's checks judge them.
        saved_names = [*INPUTS, *CONTROL_NUMBERS, "controlnet", "control_preprocess"]
        args.from_file = [n for n in saved_names if n in saved and getattr(args, n) is None]
        for name in args.from_file:
            setattr(args, name, saved[name])
        args.saved_model = saved.get("model")
        args.saved_control_image = saved.get("control_image")
        args.saved_images = {name: saved.get(name) for name in IMAGE_FILES}
        args.saved_loras = {name: saved.get(f"{name}_sha256") for name in LORA_INPUTS}
    if args.prompt is None:
        parser.error("--prompt is required (or --from-png FILE)")
    if args.controlnet is None and args.control_image is not None:
        parser.error("--control-image needs --controlnet NAME (the ControlNet it steers)")
    if args.controlnet is not None and args.control_image is None:
        saved = getattr(args, "saved_control_image", None)
        if isinstance(saved, dict):
            parser.error(
                f"{args.from_png} was laid out by a condition image of "
                f"{saved.get('width')}x{saved.get('height')} pixels (sha256 "
                f"{str(saved.get('sha256'))[:16]}...): give it with --control-image FILE"
            )
        parser.error("--controlnet needs --control-image FILE (the layout)")
    for name, record in getattr(args, "saved_images", {}).items():
        if isinstance(record, dict) and getattr(args, name) is None:
            parser.error(
                f"{args.from_png} was made from {_described(record, f'an {name}')}: give it "
                f"with --{name} FILE"
            )
    if args.mask is not None and args.image is None:
        parser.error("--mask needs --image FILE (the picture whose black part it keeps)")
    if args.output.suffix.lower() not in SUFFIX_FORMATS:
        parser.error(f"--output must end in .png, .webp or .jpg; got {str(args.output)!r}")
    if problem := output_problem(args.output):
        parser.error(problem)
    return args


def output_problem(path: Path) -> str | None:
    """Why the panorama could not be written to `path`, or None: asked before any work, by
    writing a temporary file beside it, as the panorama will be written."""
    allowed = "give a file name in a folder you can write"
    if path.is_dir():
        return f"--output {str(path)!r} is a folder: {allowed}"
    if path.exists() and not path.is_file():
        return f"--output {str(path)!r} is not a regular file: {allowed}"
    folder = path.parent
    if not folder.is_dir():
        return f"--output {str(path)!r}: its folder {str(folder)!r} does not exist: {allowed}"
    probe = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY}")
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        return (
            f"--output {str(path)!r}: cannot write in {str(folder)!r} ({one_line(error)}): "
            + allowed
        )
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    args = parse_args(argv)
    output_format = SUFFIX_FORMATS[args.output.suffix.lower()]
    try:
        check_output(output_format, args.output_quality)
        control = {}
        if args.controlnet is not None:
            control = _control_inputs(args)
        pipe = SyncDiffusionPipeline.from_pretrained(
            args.weights, device=args.device, model=args.model, controlnet=args.controlnet
        )
        described = panorama_inputs(pipe.geometry, control=bool(control))
        problems = [
            described[name].problem(getattr(args, name))
            for name in args.from_file
            if name in described
        ]
        if problems := [p for p in problems if p]:
            raise InputError(f"--from-png {args.from_png}: {'; '.join(problems)}")
        saved_model = getattr(args, "saved_model", None)
        if saved_model and saved_model != model_identity(pipe.unet.config):
            print(
                f"warning: {args.from_png} was made by another model ({saved_model!r}); "
                "the panorama will differ",
                file=sys.stderr,
            )
        names = [*INPUTS, *(CONTROL_NUMBERS if control else ())]
        inputs = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
        inputs |= _image_inputs(args)
        # Refused before the progress bar starts; a LoRA downloaded, and checked against the
        # saved panorama's, too.
        request = pipe.request(**inputs, **control)
        _check_loras(pipe.loras(request), args)
        faces = _cube_files(args.output, request) if args.cubemap else {}
        with tqdm(unit="step") as bar:

            def progress(state: dict) -> None:
                bar.total = state["steps"]
                bar.set_postfix_str("sync" if state["sync"] else "")
                bar.update(1)

            image = pipe(
                **inputs,
                **control,
                view_batch_size=args.view_batch_size,
                recompute=args.recompute,
                callback=progress,
            )
    except (InputError, WeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    parameters = image.info["parameters"]
    if control:
        parameters = {**parameters, "control_preprocess": args.control_preprocess or "none"}
    try:
        with whole_file(args.output) as temporary:
            save_image(image, temporary, parameters, output_format, args.output_quality)
    except OSError as error:  # a full disk, or the folder gone or locked since the check
        print(
            f"error: --output {str(args.output)!r}: the panorama could not be written "
            f"({one_line(error)}); nothing was left there, and the same command makes it again",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {args.output} ({image.width}x{image.height})")
    if faces:
        try:
            for name, face in cube_map(image).items():
                with whole_file(faces[name]) as temporary:
                    face.save(temporary, format="PNG")  # a perspective picture: no 360 XMP
        except OSError as error:
            print(
                f"error: the cube faces could not be written ({one_line(error)})", file=sys.stderr
            )
            return 1
        size = image.width // 4
        print(
            f"wrote {len(faces)} cube faces ({size}x{size}): {', '.join(map(str, faces.values()))}"
        )
    return 0


def _cube_files(output: Path, request: dict) -> dict[str, Path]:
    """The cube faces' files beside `output` (NAME-px.png, ...), checked before any work: the
    request must be a whole sphere, and each file writable."""
    width, height = request["width"], request["height"]
    if not (request["loop_closure"] and is_sphere(width, height)):
        loop = "" if request["loop_closure"] else " without --loop-closure"
        raise InputError(
            f"--cubemap writes the six faces of a whole sphere: it needs --loop-closure and a "
            f"height of half the width ({width}x{width // 2} for --width {width}); "
            f"got {width}x{height}{loop}"
        )
    faces = {name: output.with_name(f"{output.stem}-{name}.png") for name in FACES}
    for path in faces.values():
        if problem := output_problem(path):
            raise InputError(problem.replace("--output", "--cubemap", 1))
    return faces


def _described(record: dict, what: str) -> str:
    """A saved image's record (`control.image_record`) as a message names it."""
    return (
        f"{what} of {record.get('width')}x{record.get('height')} pixels (sha256 "
        f"{str(record.get('sha256'))[:16]}...)"
    )


def _image_inputs(args: argparse.Namespace) -> dict:
    """The image and mask of --image and --mask, opened and checked; with --from-png, refused
    unless they are the ones the saved panorama was made with."""
    inputs = {}
    saved = getattr(args, "saved_images", {})
    for name in IMAGE_FILES:
        path = getattr(args, name)
        if path is None:
            continue
        try:
            inputs[name] = open_image(path, name)
        except InputError as error:
            raise InputError(f"--{name} {path}: {error}") from None
        record = saved.get(name)
        if (
            isinstance(record, dict)
            and record.get("sha256") != image_record(inputs[name])["sha256"]
        ):
            raise InputError(
                f"--{name} {path} is not the {name} {args.from_png} was made with "
                f"({_described(record, 'an image')})"
            )
    return inputs


def _check_loras(loras: list, args: argparse.Namespace) -> None:
    """With --from-png, refuse a LoRA whose file is not the one the saved panorama was made with
    (a hub repository or URL that now serves another file)."""
    saved = getattr(args, "saved_loras", {})
    for lora in loras:
        made_with = saved.get(lora.name)
        if made_with and made_with != lora.file.sha256:
            raise InputError(
                f"{lora.name} {lora.file.source!r} is not the LoRA {args.from_png} was made with: "
                f"its file's sha256 is {lora.file.sha256[:16]}..., the saved panorama's "
                f"{str(made_with)[:16]}...; give --{lora.name.replace('_', '-')} the file it was "
                "made with"
            )


def _control_inputs(args: argparse.Namespace) -> dict:
    """The condition image of --control-image, preprocessed as asked; with --from-png, refused
    unless it is the one the saved panorama was made with."""
    try:
        image = open_control_image(args.control_image)
    except InputError as error:
        raise InputError(f"--control-image {args.control_image}: {error}") from None
    image = preprocess(image, args.control_preprocess or "none")
    saved = getattr(args, "saved_control_image", None)
    if isinstance(saved, dict) and saved.get("sha256") != image_record(image)["sha256"]:
        raise InputError(
            f"--control-image {args.control_image} is not the condition image {args.from_png} "
            f"was made with (a {saved.get('width')}x{saved.get('height')} image, sha256 "
            f"{str(saved.get('sha256'))[:16]}...; after --control-preprocess "
            f"{args.control_preprocess or 'none'})"
        )
    return {"control_image": image}


if __name__ == "__main__":
    sys.exit(main())
