"""Metadata formats: file names and tables -> the metadata record of DESIGN.md.

Every parser returns a plain dict with exactly ``RECORD_FIELDS``; a field that
does not apply is ``None``. A malformed input raises ``ValueError`` whose
message names the bad field, so a converter can report it in ``rejects.jsonl``.
"""
from __future__ import annotations

import math
import posixpath
import re
from typing import Any, Iterable, Mapping

RECORD_FIELDS = (
    "key", "source", "kind", "lat", "lon", "footprint", "utm", "image_id", "place_id",
    "year", "month", "timestamp", "nadir", "area_km2", "orientation_deg", "heading_deg",
)
KINDS = ("database", "query")

EARTHLOC_FIELDS = (
    "lat1", "lon1", "lat2", "lon2", "lat3", "lon3", "lat4", "lon4",
    "image_id", "timestamp", "nadir_lat", "nadir_lon", "area_km2", "orientation",
)
VPR_FIELDS = (
    "utm_east", "utm_north", "utm_zone", "utm_band", "lat", "lon", "panoid", "tile_num",
    "heading", "pitch", "roll", "height", "timestamp", "note",
)
GSV_CITIES_COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")

TILE_ID_RE = re.compile(r"^(\d{2})_(\d{4})_(\d{4})$")
_YEAR_FOLDER_RE = re.compile(r"(?:^|/)(\d{4})_(\d{2})(?:/|$)")
_IMAGE_EXTS = (".jpg", ".jpeg")


def empty_record(**fields: Any) -> dict:
    """A record with every field present (None where it does not apply)."""
    unknown = set(fields) - set(RECORD_FIELDS)
    if unknown:
        raise ValueError(f"unknown record field(s): {', '.join(sorted(unknown))}")
    rec = dict.fromkeys(RECORD_FIELDS)
    rec.update(fields)
    return rec


def _bad(fmt: str, name: str, field: str, why: str) -> ValueError:
    what = fmt if " " in fmt else f"{fmt} name"   # "csv row" / "earthloc name"
    return ValueError(f"malformed {what} {name!r}: field {field!r} {why}")


def _float(fmt: str, name: str, field: str, text: str, lo: float | None = None,
           hi: float | None = None) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(fmt, name, field, f"is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise _bad(fmt, name, field, f"is not finite: {text!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(fmt, name, field, f"is out of range [{lo}, {hi}]: {text!r}")
    return value


def _fmt_num(value: float) -> str:
    """Shortest text that parses back to the same float (integers without '.0')."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _fmt_fixed(value: float, decimals: int | None) -> str:
    return _fmt_num(value) if decimals is None else f"{value:.{decimals}f}"


def _split_at_fields(fmt: str, name: str, expected: tuple[str, ...]) -> list[str]:
    base = posixpath.basename(name.replace("\\", "/"))
    if not base.startswith("@"):
        raise _bad(fmt, name, expected[0], "is missing: the name must start with '@'")
    parts = base.split("@")
    ext = parts[-1].lower()
    if ext not in _IMAGE_EXTS:
        raise _bad(fmt, name, "extension", f"must be one of {_IMAGE_EXTS}, got {parts[-1]!r}")
    values = parts[1:-1]
    if len(values) != len(expected):
        missing = expected[len(values)] if len(values) < len(expected) else "extension"
        raise _bad(fmt, name, missing,
                   f"is misplaced: expected {len(expected)} '@' fields, found {len(values)}")
    return values


def footprint_centroid(footprint: Iterable[Iterable[float]]) -> tuple[float, float]:
    """Area centroid of a lat/lon quadrilateral; longitudes unwrapped across ±180.

    Falls back to the corner mean for degenerate (zero-area) polygons.
    """
    pts = [(float(a), float(b)) for a, b in footprint]
    lon0 = pts[0][1]
    lons = [lon0 + ((lon - lon0 + 180.0) % 360.0 - 180.0) for _, lon in pts]
    lats = [lat for lat, _ in pts]
    n = len(pts)
    a2 = cx = cy = 0.0
    for i in range(n):
        j = (i + 1) % n
        cross = lons[i] * lats[j] - lons[j] * lats[i]
        a2 += cross
        cx += (lons[i] + lons[j]) * cross
        cy += (lats[i] + lats[j]) * cross
    if abs(a2) < 1e-12:
        clat, clon = sum(lats) / n, sum(lons) / n
    else:
        clat, clon = cy / (3.0 * a2), cx / (3.0 * a2)
    clon = (clon + 180.0) % 360.0 - 180.0
    return clat, clon


def _year_month(timestamp: str) -> tuple[int | None, int | None]:
    digits = timestamp.strip()
    if len(digits) >= 4 and digits.isdigit():
        year = int(digits[:4])
        month = int(digits[4:6]) if len(digits) >= 6 and digits[4:6].isdigit() else None
        if month is not None and not 1 <= month <= 12:
            month = None
        return year, month
    return None, None


# ---------------------------------------------------------------- earthloc

def parse_earthloc_name(name: str) -> dict:
    """Parse an EarthLoc file name (optionally with its folder) into a record.

    ``kind`` is "database" for WMTS tile ids and "query" otherwise; the place of
    a tile is its ``image_id`` (the same ground across years).
    """
    fmt = "earthloc"
    values = dict(zip(EARTHLOC_FIELDS, _split_at_fields(fmt, name, EARTHLOC_FIELDS)))
    footprint = []
    for i in range(1, 5):
        lat = _float(fmt, name, f"lat{i}", values[f"lat{i}"], -90.0, 90.0)
        lon = _float(fmt, name, f"lon{i}", values[f"lon{i}"], -360.0, 360.0)
        footprint.append([lat, lon])
    image_id = values["image_id"]
    if not image_id or "/" in image_id:
        raise _bad(fmt, name, "image_id", f"is invalid: {image_id!r}")
    timestamp = values["timestamp"]
    year, month = _year_month(timestamp)
    if timestamp and year is None:
        raise _bad(fmt, name, "timestamp", f"is not YYYY[MM[DD]]: {timestamp!r}")
    is_tile = TILE_ID_RE.match(image_id) is not None
    if year is None and is_tile:
        folder = _YEAR_FOLDER_RE.search(posixpath.dirname(name.replace("\\", "/")))
        if folder:
            year = int(folder.group(1))
    nadir = [_float(fmt, name, "nadir_lat", values["nadir_lat"], -90.0, 90.0),
             _float(fmt, name, "nadir_lon", values["nadir_lon"], -360.0, 360.0)]
    area = _float(fmt, name, "area_km2", values["area_km2"], 0.0)
    orientation = _float(fmt, name, "orientation", values["orientation"], -360.0, 360.0)
    lat, lon = footprint_centroid(footprint)
    return empty_record(
        source=name, kind="database" if is_tile else "query", lat=lat, lon=lon,
        footprint=footprint, image_id=image_id, place_id=image_id if is_tile else None,
        year=year, month=month, timestamp=timestamp, nadir=nadir, area_km2=area,
        orientation_deg=orientation,
    )


def format_earthloc_name(record: Mapping[str, Any], decimals: int | None = None,
                         nadir_decimals: int | None = None,
                         orientation_decimals: int | None = None,
                         keep_folder: bool = False) -> str:
    """The EarthLoc file name of a record (with ``keep_folder``, under the folder of
    its ``source``).

    ``decimals`` fixes the corner precision (real queries use 6 decimals, a
    1-decimal nadir and orientation; tiles 5 decimals and orientation 0). By
    default numbers are written in their shortest exact form, which gives the
    round-trip property, for every name ``x`` that parses::

        r = parse_earthloc_name(x); y = format_earthloc_name(r, keep_folder=True)
        parse_earthloc_name(y) == {**r, "source": y}    # every field but source
        format_earthloc_name(parse_earthloc_name(y), keep_folder=True) == y

    ``y`` is not ``x`` as text: ``-1.424320`` is written ``-1.42432``. Without
    ``keep_folder`` the same holds except for a tile whose year is only in its
    folder, whose year is then written as its timestamp.
    """
    footprint = record["footprint"]
    if not footprint or len(footprint) != 4:
        raise ValueError("format_earthloc_name: record needs a 4-corner footprint")
    nadir = record.get("nadir") or [record["lat"], record["lon"]]
    source = str(record.get("source") or "").replace("\\", "/")
    folder = posixpath.dirname(source) if keep_folder else ""
    timestamp = record.get("timestamp")
    if timestamp in (None, ""):
        year_in_folder = bool(folder) and _YEAR_FOLDER_RE.search(folder) is not None
        timestamp = "" if record.get("year") is None or year_in_folder else str(record["year"])
    fields = [_fmt_fixed(v, decimals) for corner in footprint for v in corner]
    fields += [str(record["image_id"]), str(timestamp),
               _fmt_fixed(nadir[0], nadir_decimals), _fmt_fixed(nadir[1], nadir_decimals),
               _fmt_num(round(record.get("area_km2") or 0) if decimals is not None
                        else (record.get("area_km2") or 0)),
               _fmt_fixed(record.get("orientation_deg") or 0, orientation_decimals)]
    name = "@" + "@".join(fields) + "@.jpg"
    return f"{folder}/{name}" if folder else name


def earthloc_database_folder(record: Mapping[str, Any]) -> str:
    """``database/<year>_<zoom:02d>/<round(lat,-1)>_<round(lon,-1)>`` of the tile centre."""
    m = TILE_ID_RE.match(str(record["image_id"]))
    if not m:
        raise ValueError(f"not a tile id: {record['image_id']!r}")
    clat, clon = record.get("nadir") or (record["lat"], record["lon"])  # tile names: centre
    lat = int(round(clat, -1))
    lon = int(round(clon, -1))
    return f"database/{record['year']}_{m.group(1)}/{lat}_{lon}"


# ---------------------------------------------------------------- vpr

def parse_vpr_name(name: str, kind: str | None = None) -> dict:
    """Parse a VPR benchmark name ``@utm_east@utm_north@zone@band@lat@lon@panoid@...@.jpg``.

    ``kind`` defaults to "query" when a path component is ``queries``/``query``
    and to "database" otherwise.
    """
    fmt = "vpr"
    values = dict(zip(VPR_FIELDS, _split_at_fields(fmt, name, VPR_FIELDS)))
    east = _float(fmt, name, "utm_east", values["utm_east"], 0.0)
    north = _float(fmt, name, "utm_north", values["utm_north"], 0.0)
    try:
        zone = int(values["utm_zone"])
    except ValueError:
        raise _bad(fmt, name, "utm_zone", f"is not an integer: {values['utm_zone']!r}") from None
    if not 1 <= zone <= 60:
        raise _bad(fmt, name, "utm_zone", f"is out of range [1, 60]: {zone}")
    band = values["utm_band"]
    if len(band) != 1 or not band.isalpha():
        raise _bad(fmt, name, "utm_band", f"is not a letter: {band!r}")
    lat = _float(fmt, name, "lat", values["lat"], -90.0, 90.0)
    lon = _float(fmt, name, "lon", values["lon"], -180.0, 180.0)
    heading = (_float(fmt, name, "heading", values["heading"], -360.0, 360.0)
               if values["heading"] else None)
    timestamp = values["timestamp"]
    year, month = _year_month(timestamp) if timestamp else (None, None)
    if timestamp and year is None:
        raise _bad(fmt, name, "timestamp", f"is not YYYY[MM]: {timestamp!r}")
    if kind is None:
        parts = name.replace("\\", "/").split("/")[:-1]
        kind = "query" if any(p in ("queries", "query") for p in parts) else "database"
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return empty_record(
        source=name, kind=kind, lat=lat, lon=lon, utm=[east, north, zone, band.upper()],
        image_id=values["panoid"] or None, year=year, month=month,
        timestamp=timestamp or None, heading_deg=heading,
    )


def format_vpr_name(record: Mapping[str, Any]) -> str:
    """The VPR file name (no folder) of a record, in the benchmark's fixed widths."""
    east, north, zone, band = record["utm"]
    heading = record.get("heading_deg")
    def fixed(value: float, spec: str) -> str:  # the benchmarks' widths, unless digits would be lost
        text = format(value, spec)
        return text if float(text) == float(value) else _fmt_num(value)

    fields = [fixed(east, "010.2f"), fixed(north, "010.2f"), f"{int(zone):02d}", str(band),
              fixed(record["lat"], "09.5f"), fixed(record["lon"], "09.5f"),
              record.get("image_id") or "", "", "" if heading is None else _fmt_num(heading),
              "", "", "", record.get("timestamp") or "", ""]
    return "@" + "@".join(fields) + "@.jpg"


# ---------------------------------------------------------------- gsv-cities

def gsv_cities_image_name(row: Mapping[str, Any]) -> str:
    """``<city>_<place_id:07d>_<year:04d>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg``."""
    return (f"{row['city_id']}_{int(row['place_id']):07d}_{int(row['year']):04d}_"
            f"{int(row['month']):02d}_{int(float(row['northdeg'])):03d}_{row['lat']}_{row['lon']}_"
            f"{row['panoid']}.jpg")


def parse_gsv_cities_row(row: Mapping[str, Any], source: str | None = None) -> dict:
    """A record from one row of ``Dataframes/<City>.csv``.

    Place ids are only unique within a city, so ``place_id`` is ``<city>_<id:07d>``.
    """
    fmt = "gsv-cities row"
    where = source or str(dict(row))
    missing = [c for c in GSV_CITIES_COLUMNS if row.get(c) in (None, "")]
    if missing:
        raise ValueError(f"malformed {fmt} {where!r}: field {missing[0]!r} is missing")
    ints = {}
    for col in ("place_id", "year", "month"):
        try:
            ints[col] = int(float(row[col]))
        except ValueError:
            raise ValueError(f"malformed {fmt} {where!r}: field {col!r} is not an "
                             f"integer: {row[col]!r}") from None
    if not 1 <= ints["month"] <= 12:
        raise ValueError(f"malformed {fmt} {where!r}: field 'month' is out of range "
                         f"[1, 12]: {row['month']!r}")
    lat = _float(fmt, where, "lat", str(row["lat"]), -90.0, 90.0)
    lon = _float(fmt, where, "lon", str(row["lon"]), -180.0, 180.0)
    heading = _float(fmt, where, "northdeg", str(row["northdeg"]), -360.0, 360.0)
    city = str(row["city_id"])
    return empty_record(
        source=source if source is not None else gsv_cities_image_name(row), kind="database",
        lat=lat, lon=lon, image_id=str(row["panoid"]),
        place_id=f"{city}_{ints['place_id']:07d}", year=ints["year"], month=ints["month"],
        timestamp=f"{ints['year']:04d}{ints['month']:02d}", heading_deg=heading,
    )


def parse_gsv_cities_name(name: str) -> dict:
    """A record from a GSV-Cities image name alone (the panoid may contain '_')."""
    base = posixpath.basename(name.replace("\\", "/"))
    stem, dot, ext = base.rpartition(".")
    if not dot or ext.lower() not in ("jpg", "jpeg"):
        raise ValueError(f"malformed gsv-cities name {name!r}: field 'extension' must be .jpg")
    parts = stem.split("_", 7)
    if len(parts) != 8:
        field = ("city_id", "place_id", "year", "month", "northdeg", "lat", "lon", "panoid")[
            len(parts)] if len(parts) < 8 else "panoid"
        raise ValueError(f"malformed gsv-cities name {name!r}: field {field!r} is missing")
    row = dict(zip(("city_id", "place_id", "year", "month", "northdeg", "lat", "lon", "panoid"),
                   parts))
    return parse_gsv_cities_row(row, source=name)


# ---------------------------------------------------------------- generic csv

CSV_REQUIRED = ("path", "lat", "lon", "place_id")
CSV_FOOTPRINT = ("lat1", "lon1", "lat2", "lon2", "lat3", "lon3", "lat4", "lon4")
_CSV_OPTIONAL_INT = ("year", "month")
_CSV_OPTIONAL_FLOAT = {"area_km2": "area_km2", "orientation_deg": "orientation_deg",
                       "heading_deg": "heading_deg"}


def parse_csv_row(row: Mapping[str, Any]) -> dict:
    """A record from a generic table row: ``path, lat, lon, place_id`` (+ optional columns).

    Optional: ``kind``, ``image_id``, ``year``, ``month``, ``timestamp``, the
    eight footprint corners ``lat1..lon4``, ``area_km2``, ``orientation_deg``,
    ``heading_deg``.
    """
    fmt = "csv row"
    where = str(row.get("path") or dict(row))
    missing = [c for c in CSV_REQUIRED if row.get(c) in (None, "")]
    if missing:
        raise ValueError(f"malformed {fmt} {where!r}: field {missing[0]!r} is missing")
    lat = _float(fmt, where, "lat", str(row["lat"]), -90.0, 90.0)
    lon = _float(fmt, where, "lon", str(row["lon"]), -180.0, 180.0)
    footprint = None
    if any(row.get(c) not in (None, "") for c in CSV_FOOTPRINT):
        footprint = [[_float(fmt, where, f"lat{i}", str(row.get(f"lat{i}", "")), -90.0, 90.0),
                      _float(fmt, where, f"lon{i}", str(row.get(f"lon{i}", "")), -360.0, 360.0)]
                     for i in range(1, 5)]
    extra: dict[str, Any] = {}
    for col in _CSV_OPTIONAL_INT:
        if row.get(col) not in (None, ""):
            try:
                extra[col] = int(float(row[col]))
            except ValueError:
                raise ValueError(f"malformed {fmt} {where!r}: field {col!r} is not an "
                                 f"integer: {row[col]!r}") from None
    if "month" in extra and not 1 <= extra["month"] <= 12:
        raise ValueError(f"malformed {fmt} {where!r}: field 'month' is out of range "
                         f"[1, 12]: {row['month']!r}")
    for col, field in _CSV_OPTIONAL_FLOAT.items():
        if row.get(col) not in (None, ""):
            extra[field] = _float(fmt, where, col, str(row[col]))
    kind = row.get("kind") or "database"
    if kind not in KINDS:
        raise ValueError(f"malformed {fmt} {where!r}: field 'kind' must be one of {KINDS}")
    return empty_record(
        source=str(row["path"]), kind=kind, lat=lat, lon=lon, footprint=footprint,
        image_id=row.get("image_id") or None, place_id=str(row["place_id"]),
        timestamp=row.get("timestamp") or None, **extra,
    )


NAME_PARSERS = {
    "earthloc": parse_earthloc_name,
    "vpr": parse_vpr_name,
    "gsv-cities": parse_gsv_cities_name,
}
