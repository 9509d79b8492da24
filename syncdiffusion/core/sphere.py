"""The whole sphere: an equirectangular picture and the six faces of its cube map.

An equirectangular picture `W` x `W/2` spans 360 degrees around (its columns, longitude) and
180 degrees from the zenith (top row) to the nadir (bottom row). A cube map is six square
90-degree perspective pictures, one per axis, in three.js's and OpenGL's order (`FACES`: +x,
-x, +y, -y, +z, -z; +y is up): what a game engine's skybox takes.

Directions are unit vectors (x, y, z) in the frame cube maps are defined in (OpenGL's and
Direct3D's cube-map tables, Unity): left-handed, +y up, and looking along +z, +x is on the
right. Each face's pixels follow OpenGL's cube-map table (the major axis `ma` and the face's
`sc`, `tc`, row 0 at the top), so each face is the view along its axis as a viewer at the
centre sees it, not its mirror image. The equirectangular picture's middle column looks
towards +x and its columns turn right, towards -z: `u = 0.5 - atan2(z, x) / 2pi`,
`v = 0.5 - asin(y) / pi` from the top, as Unity's panoramic skybox reads a "LatLong" picture,
so that the picture and its cube map show the same sky in Unity. three.js, whose world is
right-handed, reads an equirectangular picture so too (its +z is this frame's -z) but flips x
for a cube map, so it shows the faces turned half a turn about +y from the picture.

Only the geometry is written here; the filtering is torch's `grid_sample` (bilinear), with
the equirectangular picture's columns wrapped around the seam.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Three.js's CubeTexture order, and the file suffixes of a cube map's faces.
FACES = ("px", "nx", "py", "ny", "pz", "nz")


def face_directions(face: str, size: int) -> torch.Tensor:
    """The directions through the centres of a `size`-square face's pixels, (size, size, 3),
    not normalised (the major axis is 1): OpenGL's cube-map table read backwards."""
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    tc, sc = torch.meshgrid(coords, coords, indexing="ij")  # rows: t, columns: s
    one = torch.ones_like(sc)
    # OpenGL: +x: sc = -z, tc = -y; -x: sc = z, tc = -y; +y: sc = x, tc = z; -y: sc = x,
    # tc = -z; +z: sc = x, tc = -y; -z: sc = -x, tc = -y.
    axes = {
        "px": (one, -tc, -sc),
        "nx": (-one, -tc, sc),
        "py": (sc, one, tc),
        "ny": (sc, -one, -tc),
        "pz": (sc, -tc, one),
        "nz": (-sc, -tc, -one),
    }
    if face not in axes:
        raise ValueError(f"face must be one of {', '.join(FACES)}; got {face!r}")
    return torch.stack(axes[face], dim=-1)


def equirect_coordinates(directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where `directions` (..., 3) fall in an equirectangular picture: (u, v) in [0, 1), u
    from the left edge (longitude, the middle column towards +x, the columns turning towards
    -z), v from the top (the zenith)."""
    x, y, z = directions.unbind(-1)
    u = 0.5 - torch.atan2(z, x) / (2 * math.pi)
    v = 0.5 - torch.atan2(y, torch.hypot(x, z)) / math.pi
    return u, v


def equirect_directions(width: int, height: int) -> torch.Tensor:
    """The directions through the centres of a `width` x `height` equirectangular picture's
    pixels, (height, width, 3), unit length."""
    u = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    v = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    longitude = (u - 0.5) * 2 * math.pi
    latitude = (0.5 - v) * math.pi
    lat, lon = torch.meshgrid(latitude, longitude, indexing="ij")
    return torch.stack([lat.cos() * lon.cos(), lat.sin(), -lat.cos() * lon.sin()], dim=-1)


def equirect_to_face(picture: torch.Tensor, face: str, size: int) -> torch.Tensor:
    """One face (`size` square) of an equirectangular `picture` (n, c, H, W): (n, c, size,
    size), sampled bilinearly, the columns wrapped around the picture's seam."""
    u, v = equirect_coordinates(face_directions(face, size))
    return sample_equirect(picture, u, v)


def sample_equirect(picture: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`picture` (n, c, H, W) sampled bilinearly at (u, v) (h, w each, `equirect_coordinates`):
    (n, c, h, w). The columns wrap (one column of the other edge padded on each side); above
    the top row's centres and below the bottom row's, the edge row."""
    n, width = picture.shape[0], picture.shape[-1]
    padded = torch.cat([picture[..., -1:], picture, picture[..., :1]], dim=-1)
    # Pixel centres of the padded picture: column k of the picture is k + 1 there.
    x = (u * width + 1) / (width + 2) * 2 - 1
    y = v * 2 - 1
    grid = torch.stack([x, y], dim=-1).to(picture.dtype).expand(n, *u.shape, 2)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="border", align_corners=False)


def equirect_to_cube(picture: torch.Tensor, size: int | None = None) -> dict[str, torch.Tensor]:
    """The six faces of an equirectangular `picture` (n, c, H, W), by name (`FACES`), each
    (n, c, size, size); `size` defaults to W / 4, the equator's pixels per 90 degrees."""
    size = size or picture.shape[-1] // 4
    return {face: equirect_to_face(picture, face, size) for face in FACES}


def cube_coordinates(directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which face each of `directions` (..., 3) falls on (its index in `FACES`) and where:
    (s, t) in [0, 1], s from the face's left, t from its top (OpenGL's table)."""
    x, y, z = directions.unbind(-1)
    ax, ay, az = x.abs(), y.abs(), z.abs()
    major = torch.stack([ax, ay, az], dim=-1).argmax(dim=-1)  # 0: x, 1: y, 2: z
    face = torch.where(
        major == 0,
        torch.where(x > 0, 0, 1),
        torch.where(major == 1, torch.where(y > 0, 2, 3), torch.where(z > 0, 4, 5)),
    )
    ma = torch.where(major == 0, ax, torch.where(major == 1, ay, az))
    sc = torch.stack([-z, z, x, x, x, -x], dim=-1).gather(-1, face.unsqueeze(-1)).squeeze(-1)
    tc = torch.stack([-y, -y, z, -z, -y, -y], dim=-1).gather(-1, face.unsqueeze(-1)).squeeze(-1)
    return face, (sc / ma + 1) / 2, (tc / ma + 1) / 2


def cube_to_equirect(faces: dict[str, torch.Tensor], width: int) -> torch.Tensor:
    """The equirectangular picture `width` x `width / 2` (n, c, H, W) of six faces (`FACES`,
    each (n, c, S, S)): each pixel sampled bilinearly on the face its direction meets."""
    face, s, t = cube_coordinates(equirect_directions(width, width // 2))
    out = None
    for k, name in enumerate(FACES):
        sampled = sample_face(faces[name], s, t)
        out = sampled.new_zeros(sampled.shape) if out is None else out
        out = torch.where((face == k).to(sampled.device), sampled, out)
    return out


def sample_face(picture: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A face `picture` (n, c, S, S) sampled bilinearly at (s, t) (h, w each, in [0, 1] from
    its top left, `cube_coordinates`): (n, c, h, w), the edge pixels beyond its edges."""
    grid = torch.stack([s * 2 - 1, t * 2 - 1], dim=-1).to(picture.dtype)
    grid = grid.expand(picture.shape[0], *grid.shape)
    return F.grid_sample(picture, grid, mode="bilinear", padding_mode="border", align_corners=False)


def is_sphere(width: int, height: int) -> bool:
    """Whether a 360-degree picture `width` x `height` is the whole sphere (2:1)."""
    return 2 * height == width


def cube_map(picture: Image.Image, size: int | None = None) -> dict[str, Image.Image]:
    """The six faces of a whole-sphere equirectangular `picture` (2:1, RGB), by name (`FACES`),
    each `size` square (default a quarter of its width), 8-bit RGB."""
    faces = equirect_to_cube(to_tensor(picture), size)
    return {name: to_picture(face) for name, face in faces.items()}


# The one-file layouts of a cube map (`cube_picture`), each as (column, row) of every face in
# a grid of faces: a row of six in `FACES`' order (6:1), and the horizontal cross (4:3), the
# side faces in a row as a viewer turning right meets them (-x, +z, +x, -z), the up face
# above +z and the down face below it. Unity's texture importer (Texture Shape: Cube) reads
# both, telling them apart by their proportions.
CUBE_LAYOUTS = {
    "strip": {face: (k, 0) for k, face in enumerate(FACES)},
    "cross": {"py": (1, 0), "nx": (0, 1), "pz": (1, 1), "px": (2, 1), "nz": (3, 1), "ny": (1, 2)},
}


def cube_picture(faces: Mapping[str, Image.Image], layout: str) -> Image.Image:
    """The six `faces` (`FACES`, each S square) in one picture laid out as `layout` says
    (`CUBE_LAYOUTS`: "strip", 6S x S, or "cross", 4S x 3S, black where no face is)."""
    if layout not in CUBE_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(CUBE_LAYOUTS)}; got {layout!r}")
    places = CUBE_LAYOUTS[layout]
    size = faces[FACES[0]].width
    columns = 1 + max(column for column, _ in places.values())
    rows = 1 + max(row for _, row in places.values())
    picture = Image.new("RGB", (columns * size, rows * size))
    for face, (column, row) in places.items():
        picture.paste(faces[face], (column * size, row * size))
    return picture


# A whole sphere is made in three parts: the band around the horizon, a loop-closure panorama
# from BAND_LATITUDE below the horizon to BAND_LATITUDE above it, and the sky and ground caps,
# the up and down cube faces made as ordinary square pictures: the band's projection onto the
# face kept below CAP_LATITUDE and the rest made anew (inpainting, the kept part held to the
# band). In the picture the band gives way to the caps linearly from BLEND_FROM to
# CAP_LATITUDE; nearer the horizon the picture is the band's, to the bit. Degrees.
BAND_LATITUDE = 60.0
CAP_LATITUDE = 55.0
BLEND_FROM = 45.0
CAPS = ("py", "ny")  # the sky's face and the ground's
# The input that says what each cap shows, where not the prompt (`cap_prompt`).
CAP_PROMPTS = {"py": "sky_prompt", "ny": "ground_prompt"}


def band_height(width: int) -> int:
    """The band's height in pixels for a sphere `width` wide: BAND_LATITUDE up and down, a
    multiple of 8 (so its latitudes are within a degree of it at any width of 1024 or more)."""
    return round(width / 2 * 2 * BAND_LATITUDE / 180 / 8) * 8


def face_size(width: int) -> int:
    """A cube face's side for a sphere `width` wide: the equator's pixels per 90 degrees."""
    return width // 4


def face_latitudes(face: str, size: int) -> torch.Tensor:
    """The latitude in degrees of each of a face's pixel centres, (size, size)."""
    d = face_directions(face, size)
    return torch.rad2deg(torch.atan2(d[..., 1], torch.hypot(d[..., 0], d[..., 2])))


def cap_mask(face: str, size: int) -> Image.Image:
    """What a cap makes anew (white) and keeps of the band (black): the face's pixels further
    than CAP_LATITUDE from the horizon, the sky's above and the ground's below."""
    made = face_latitudes(face, size).abs() > CAP_LATITUDE
    return Image.fromarray(made.numpy().astype(np.uint8) * 255)


def to_tensor(picture: Image.Image) -> torch.Tensor:
    """An 8-bit RGB picture as (1, 3, H, W) float64 in [0, 255]."""
    pixels = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float64))
    return pixels.permute(2, 0, 1).unsqueeze(0)


def to_picture(pixels: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [0, 255] as an 8-bit RGB picture, rounded."""
    rounded = pixels[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(rounded.numpy())


def band_canvas(band: Image.Image) -> torch.Tensor:
    """The whole sphere's picture (1, 3, W/2, W) with the band (W wide) in its middle rows and
    the band's top and bottom rows repeated above and below it (what a cap makes anew)."""
    pixels = to_tensor(band)
    above = (band.width // 2 - band.height) // 2
    below = band.width // 2 - band.height - above
    top, bottom = pixels[..., :1, :], pixels[..., -1:, :]
    return torch.cat([top.expand(-1, -1, above, -1), pixels, bottom.expand(-1, -1, below, -1)], -2)


def cap_picture(band: Image.Image, face: str) -> Image.Image:
    """What a cap starts from: the band's canvas (`band_canvas`) seen from the sphere's centre
    along `face`'s axis, a face a quarter of the band's width square."""
    return to_picture(equirect_to_face(band_canvas(band), face, face_size(band.width)))


def sphere_picture(band: Image.Image, caps: dict[str, Image.Image]) -> Image.Image:
    """The whole sphere (W x W/2) from its band and its caps (`CAPS`, each a face): the band
    within BLEND_FROM of the horizon, the caps beyond CAP_LATITUDE, a linear blend between."""
    canvas = band_canvas(band)
    width = band.width
    directions = equirect_directions(width, width // 2)
    latitude = torch.rad2deg(torch.asin(directions[..., 1].clamp(-1, 1)))  # (H, W)
    weight = ((latitude.abs() - BLEND_FROM) / (CAP_LATITUDE - BLEND_FROM)).clamp(0, 1)
    face, s, t = cube_coordinates(directions)
    faces = {name: to_tensor(caps[name]) for name in CAPS}
    out = canvas.clone()
    for name in CAPS:
        sampled = sample_face(faces[name], s, t)
        on_face = (face == FACES.index(name)) & (weight > 0)
        mixed = canvas + weight * (sampled - canvas)
        out = torch.where(on_face, mixed, out)
    # The top row lies within half a row of the zenith, the bottom row of the nadir: each is
    # that one point, the centre of its face.
    centre = torch.full((1, 1), 0.5, dtype=out.dtype)
    for row, name in ((0, "py"), (-1, "ny")):
        pole = sample_face(faces[name], centre, centre)  # (1, 3, 1, 1)
        out[..., row, :] = pole[..., 0, :]  # over every column
    return to_picture(out)


def sphere_parts(request: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The panorama requests of a whole-sphere `request`'s band (a loop-closure panorama
    `band_height` high) and of each of its caps (a face `face_size` square, from noise where it
    is made anew; its image and mask are the band's, given once the band is made)."""
    width = request["width"]
    band = {**request, "sphere": False, "height": band_height(width), "loop_closure": True}
    size = face_size(width)
    cap = {**band, "width": size, "height": size, "loop_closure": False, "prompt_strength": 1.0}
    return band, cap


def cap_prompt(request: Mapping[str, Any], face: str) -> str:
    """What the cap on `face` shows: its own prompt (`CAP_PROMPTS`), or the request's where
    that is empty (or was not an input)."""
    return request.get(CAP_PROMPTS[face]) or request["prompt"]
