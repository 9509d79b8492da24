"""Reproducible files: the panorama saved with every input that made it, and read back; a
360-degree panorama also carries the photo-sphere metadata that tells viewers what it is."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from ..errors import one_line
from .inputs import OUTPUT_FORMATS

logger = logging.getLogger(__name__)

PARAMETERS_KEY = "syncdiffusion-parameters"  # PNG text chunk: all parameters as JSON
_EXIF_IMAGE_DESCRIPTION = 0x010E  # where WebP and JPEG files carry the same JSON
# A JPEG marker segment holds at most 65,535 bytes, its 2-byte length included: EXIF must fit one.
_JPEG_SEGMENT_BYTES = 65533
_TEXT_INPUTS = ("prompt", "negative_prompt")  # the only inputs that can be long
XMP_PNG_KEY = "XML:com.adobe.xmp"  # the iTXt chunk that carries XMP in a PNG file
GPANO_NAMESPACE = "http://ns.google.com/photos/1.0/panorama/"
TEMPORARY = ".tmp"  # suffix of files being written; never an image suffix


def model_identity(unet_config: dict[str, Any]) -> str:
    """A short hash of the UNet's config: which model made a file, without shipping its path."""
    public = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:16]


def photo_sphere(width: int, height: int) -> dict[str, Any]:
    """Google's Photo Sphere (GPano) fields for a 360-degree panorama `width` x `height`.

    The full sphere is `width` x `width / 2` (equirectangular: 360 by 180 degrees), and the
    picture a band of it centred on the horizon. A picture taller than `width / 2` would
    reach past the poles: it is declared the whole sphere (with the 2:1 proportions viewers
    insist on), so viewers squeeze its height onto 180 degrees.
    """
    full_height = width // 2
    band_height = min(height, full_height)
    return {
        "ProjectionType": "equirectangular",
        "UsePanoramaViewer": True,
        "FullPanoWidthPixels": width,
        "FullPanoHeightPixels": full_height,
        "CroppedAreaImageWidthPixels": width,
        "CroppedAreaImageHeightPixels": band_height,
        "CroppedAreaLeftPixels": 0,
        "CroppedAreaTopPixels": (full_height - band_height) // 2,
    }


def photo_sphere_xmp(width: int, height: int) -> bytes:
    """An XMP packet with the `photo_sphere` fields, as JPEG, PNG and WebP files carry it."""
    fields = "".join(
        f"\n   <GPano:{name}>{value}</GPano:{name}>"
        for name, value in photo_sphere(width, height).items()
    )
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        f'  <rdf:Description rdf:about="" xmlns:GPano="{GPANO_NAMESPACE}">{fields}\n'
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    ).encode()


def _exif(parameters: dict[str, Any]) -> Image.Exif:
    exif = Image.Exif()
    exif[_EXIF_IMAGE_DESCRIPTION] = json.dumps(parameters, sort_keys=True)  # ASCII: \u escapes
    return exif


def _fits_jpeg(parameters: dict[str, Any]) -> bool:
    return len(_exif(parameters).tobytes()) <= _JPEG_SEGMENT_BYTES


def _cut_texts(parameters: dict[str, Any], length: int) -> dict[str, Any]:
    return {
        key: value[:length] if key in _TEXT_INPUTS and isinstance(value, str) else value
        for key, value in parameters.items()
    }


def fit_parameters(
    parameters: dict[str, Any], fits: Callable[[dict[str, Any]], bool], where: str
) -> dict[str, Any] | None:
    """`parameters` as they fit a file's metadata: the texts cut to the longest length that
    `fits`, or None if even empty texts do not; every cut is logged."""
    if fits(parameters):
        return parameters
    if not fits(_cut_texts(parameters, 0)):
        logger.warning("the parameters do not fit the metadata of a %s file; it has none", where)
        return None
    low, high = 0, max(len(v) for k, v in parameters.items() if k in _TEXT_INPUTS)
    while low < high:  # the longest length that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(_cut_texts(parameters, middle)) else (low, middle - 1)
    fitted = _cut_texts(parameters, low)
    for key in _TEXT_INPUTS:
        if fitted.get(key) != parameters.get(key):
            logger.warning(
                "the %s file keeps the first %d of %d characters of %s: its metadata holds at "
                "most 64 KB (the text encoder reads only the first 77 tokens)",
                where,
                low,
                len(parameters[key]),
                key,
            )
    return fitted


def _png_text(value: Any) -> str:
    """`value` as PNG text: a NUL, which PNG text forbids (readers end the text there), and a
    lone surrogate, which UTF-8 cannot hold, become their escapes (`\\x00`, `\\udc80`)."""
    text = str(value).replace("\0", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def save_image(
    image: Image.Image,
    path: str | Path,
    parameters: dict[str, Any],
    output_format: str = "png",
    quality: int = 80,
    photo_sphere: bool | None = None,
) -> Path:
    """Write `image` as png, webp or jpg with `parameters` inside (PNG text chunks or EXIF).

    With `photo_sphere` (default: `parameters["loop_closure"]`) the file also carries
    photo-sphere XMP, so 360-degree viewers open it as one; a cube map laid out in one
    picture is not equirectangular and is saved with `photo_sphere=False`. Metadata never
    stops the save: what a format cannot hold is cut or left out, and the logs say so.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(
            f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {output_format!r}"
        )
    path = Path(path)
    xmp = None
    if parameters.get("loop_closure") if photo_sphere is None else photo_sphere:
        xmp = photo_sphere_xmp(image.width, image.height)
        if image.height > image.width // 2:
            logger.warning(
                "a 360-degree panorama %dx%d is taller than half its width, so it cannot be a "
                "band of a sphere; its metadata declares the whole sphere (%dx%d), so viewers "
                "squeeze it vertically by a factor of %.2f; a height of at most %d keeps its "
                "proportions",
                image.width,
                image.height,
                image.width,
                image.width // 2,
                image.height / (image.width // 2),
                image.width // 2,
            )
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
        for key, value in parameters.items():
            info.add_text(key, _png_text(value))
        if xmp is not None:
            info.add_itxt(XMP_PNG_KEY, xmp.decode())
        image.save(path, format="PNG", pnginfo=info)
        return path
    options: dict[str, Any] = {"quality": quality}
    if xmp is not None:
        options["xmp"] = xmp
    # WebP's RIFF chunks hold gigabytes; a JPEG segment 64 KB.
    fitted = parameters
    if output_format == "jpg":
        fitted = fit_parameters(parameters, _fits_jpeg, "jpg")
    if fitted is not None:
        options["exif"] = _exif(fitted)
    image.save(path, format="WEBP" if output_format == "webp" else "JPEG", **options)
    return path


@contextlib.contextmanager
def whole_file(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` (`.NAME.PID.tmp`) to write to, renamed to `path` when
    the block ends and removed if it fails: `path` is never a half-written file, and a write
    that fails (a full disk) leaves nothing behind."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The parameters saved in a panorama file by `save_image`, read from its metadata alone:
    never its pixels. ValueError naming the file and what is wrong with it otherwise."""
    text = _saved_text(path)
    if text is None:
        raise ValueError(f"{path} carries no SyncDiffusion parameters")
    if not isinstance(text, str):  # a crafted EXIF tag of another type
        raise ValueError(
            f"{path}: its EXIF ImageDescription is not text but {type(text).__name__} {text!r:.60}"
        )
    try:
        parameters = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{path}: its saved parameters are not valid JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{path}: its saved parameters are nested too deeply") from None
    if not isinstance(parameters, dict):
        raise ValueError(
            f"{path}: its saved parameters must be a JSON object; got a {type(parameters).__name__}"
        )
    return parameters


def _saved_text(path: str | Path) -> Any:
    """The parameters' text in a file's header: the PNG chunk, else EXIF's ImageDescription."""
    try:
        with warnings.catch_warnings():  # the pixels are never decoded: their size is harmless
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                info = dict(image.info)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{path} is too large to be a panorama ({error})") from None
    except Exception as error:  # Pillow's parsers raise many types on a crafted file
        raise ValueError(f"{path} is not an image this tool can read ({one_line(error)})") from None
    if info.get(PARAMETERS_KEY):
        return info[PARAMETERS_KEY]
    if not info.get("exif"):
        # PNG's getexif() would decode every pixel looking for an eXIf chunk after them.
        return None
    exif = Image.Exif()
    try:
        exif.load(info["exif"])
    except Exception as error:  # the same, for EXIF's parser
        raise ValueError(f"{path}: its EXIF is unreadable ({one_line(error)})") from None
    return exif.get(_EXIF_IMAGE_DESCRIPTION)
