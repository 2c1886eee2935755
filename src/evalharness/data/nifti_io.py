"""Read image files exactly as `tio.ScalarImage(path)` does (the training side), decompressing once.

The reference is SimpleITK's `ReadImage` followed by TorchIO's `sitk_to_nib(image, keepdim=True)`:
[C, X, Y, Z] voxels in the file's dtype (uint16/uint32 widened as TorchIO does) and a RAS+
affine. Plain .nii and .nii.gz files that SimpleITK reads verbatim take a faster road to the
same result:

- the geometry is SimpleITK's own (`ImageFileReader.ReadImageInformation`, the header only), so
  qform/sform choices and the LPS→RAS conversion are ITK's and TorchIO's, not nibabel's;
- the voxels are decompressed once (python-isal, the GIL released for the whole file, which
  matters because the next case is read on a prefetch thread) straight into the array that is
  returned, in file order, which is the memory layout `sitk_to_nib` gives (a Fortran-ordered
  [X, Y, Z] under the channel axis);
- the completeness and NaN/Inf checks use those bytes: no second decompression.

That road is taken only where the result is provably the reference's: a NIfTI-1 single file
that nibabel's header checks accept, read by ITK's NiftiImageIO as a 3-D or 4-D scalar image
of the file's own integer/float type (either byte order), without intensity scaling (ITK's
rule: a slope of 0 or non-finite means 1, a non-finite intercept 0; the fast road needs 1 and
0). Anything else (scaled or RGB/complex/vector data, other dimensions, other formats, headers
nibabel rejects, corrupt compressed data) is read the reference way.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import zlib
from pathlib import Path
from typing import Protocol

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio
from isal import igzip, isal_zlib
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from torchio.data.io import check_uint_to_int, get_ras_affine_from_sitk, sitk_to_nib

from evalharness.errors import CaseError, writing

NIFTI1_HEADER_BYTES = 348  # the least a NIfTI file holds
MAX_VOX_OFFSET = 1 << 24  # header + extensions beyond this are left to the reference reader
PIXEL_IDS = {  # numpy dtype (native order) -> SimpleITK pixel type of the same values
    np.dtype(np.uint8): sitk.sitkUInt8,
    np.dtype(np.int8): sitk.sitkInt8,
    np.dtype(np.uint16): sitk.sitkUInt16,
    np.dtype(np.int16): sitk.sitkInt16,
    np.dtype(np.uint32): sitk.sitkUInt32,
    np.dtype(np.int32): sitk.sitkInt32,
    np.dtype(np.uint64): sitk.sitkUInt64,
    np.dtype(np.int64): sitk.sitkInt64,
    np.dtype(np.float32): sitk.sitkFloat32,
    np.dtype(np.float64): sitk.sitkFloat64,
}
ITK_EPSILON = float(np.finfo(np.float64).eps)  # NiftiImageIO's tolerance for slope and intercept


class _Stream(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


def require_file(path: Path, role: str) -> None:
    """`CaseError` unless `path` is a file: "<path>: <role> file not found", or a folder."""
    if path.is_dir():
        raise CaseError(f"{path}: is a folder, expected a {role} file (NIfTI)")
    if not path.is_file():
        raise CaseError(f"{path}: {role} file not found")


def read_image(path: Path) -> tio.ScalarImage:
    """[C, X, Y, Z] voxels in the file's dtype and RAS+ affine, as `tio.ScalarImage(path)` reads.

    3-D files give C=1; 4-D files are channels-last and come back channels-first. Anything else,
    an unreadable or truncated file or non-finite voxels raise `CaseError` naming the file.
    """
    path = Path(path)
    read = read_nifti_fast(path)
    data, affine = read if read is not None else _read_with_simpleitk(path)
    return tio.ScalarImage(tensor=torch.as_tensor(data), affine=affine)


def read_nifti_fast(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """`sitk_to_nib(sitk.ReadImage(path), keepdim=True)` for the files the module doc names;
    None for any other file (the caller reads it the reference way). `CaseError` for a
    truncated file or non-finite voxels."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    reader = _simpleitk_header(path)
    if reader is None:
        return None
    try:
        if name.endswith(".nii"):
            with path.open("rb", buffering=0) as stream:
                return _read_verbatim(path, stream, reader)
        # the whole compressed file in memory: one call decompresses it with the GIL released
        # (from a file object, every 512 KiB read would take the GIL back)
        return _read_verbatim(path, _gunzipped(path.read_bytes()), reader)
    except (OSError, ValueError, EOFError, isal_zlib.error):  # corrupt: SimpleITK says what
        return None


def _gunzipped(compressed: bytes) -> _Stream:
    """A reader of the decompressed bytes of a gzip file. python-isal's one-shot reader (what
    `igzip.decompress` uses; private) fills the voxel array directly; should a release drop
    it, the public call decompresses to bytes first (one more copy)."""
    reader = getattr(isal_zlib, "_GzipReader", None)
    if reader is not None:
        return reader(compressed)
    return io.BytesIO(igzip.decompress(compressed))


def _simpleitk_header(path: Path) -> sitk.ImageFileReader | None:
    """SimpleITK's reading of the header, when its NIfTI reader takes a 3-D/4-D scalar image."""
    try:
        if sitk.ImageFileReader.GetImageIOFromFileName(str(path)) != "NiftiImageIO":
            return None
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.SetImageIO("NiftiImageIO")
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    if reader.GetDimension() not in (3, 4) or reader.GetNumberOfComponents() != 1:
        return None
    return reader


def _read_verbatim(
    path: Path, stream: _Stream, reader: sitk.ImageFileReader
) -> tuple[np.ndarray, np.ndarray] | None:
    """Header from `stream`; if SimpleITK reads the voxels unchanged, read them from `stream`."""
    header = _nifti_header(stream)
    if header is None or not _verbatim_in_simpleitk(header, reader):
        return None
    file_dtype = header.get_data_dtype()
    size = tuple(int(n) for n in reader.GetSize())
    flat = np.empty(math.prod(size), dtype=file_dtype.newbyteorder("="))
    if _read_fully(stream, memoryview(flat).cast("B")) < flat.nbytes:
        expected = header.get_data_offset() + flat.nbytes
        what = f"{expected} bytes of NIfTI header and voxels"
        raise CaseError(f"{path}: file is truncated (expected {what}; the file ends before)")
    if _read_exactly(stream, 1) is not None:
        raise CaseError(_more_data_than_header(path, size, header.get_data_offset() + flat.nbytes))
    if not file_dtype.isnative:
        flat.byteswap(inplace=True)  # the values now, in native order
    if flat.dtype.kind == "f" and not np.isfinite([flat.min(), flat.max()]).all():
        raise CaseError(f"{path}: image holds NaN or infinite voxels")
    data = check_uint_to_int(flat.reshape(size, order="F"))  # file order: x fastest
    data = data[np.newaxis] if len(size) == 3 else data.transpose(3, 0, 1, 2)
    return data, get_ras_affine_from_sitk(reader)


def _more_data_than_header(path: Path, size: tuple[int, ...], expected: int) -> str:
    return (
        f"{path}: the file holds more voxel data than its header's dimensions "
        f"{'x'.join(map(str, size))} describe (expected {expected} bytes of NIfTI header and "
        "voxels); the header's dim field is likely wrong"
    )


def _nifti_header(stream: _Stream) -> nib.Nifti1Header | None:
    """The NIfTI-1 single-file header (with extensions) at the start of `stream`, checked as
    `nib.load` checks it, the stream left at the first voxel; None if it is no such header.
    (NIfTI-2 needs no fast road: this SimpleITK does not read it.)"""
    head = _read_exactly(stream, NIFTI1_HEADER_BYTES)
    if head is None:
        return None
    try:  # whatever nibabel rejects, the reference reader handles
        offset = int(nib.Nifti1Header(head, check=False)["vox_offset"])
        if not nib.Nifti1Header.single_vox_offset <= offset <= MAX_VOX_OFFSET:
            return None
        if (extensions := _read_exactly(stream, offset - len(head))) is None:
            return None
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(head + extensions))
        header.get_data_shape()  # what nib.load's array proxy asks for: raise here if it fails
        header.get_data_dtype()
    except Exception:
        return None
    return header if header["magic"].item() == header.single_magic else None


def _verbatim_in_simpleitk(header: nib.Nifti1Header, reader: sitk.ImageFileReader) -> bool:
    """Whether SimpleITK reads the voxels after `header` as they are: the same shape, the same
    pixel type and no intensity scaling (see the module doc)."""
    shape = header.get_data_shape()
    size = tuple(int(n) for n in reader.GetSize())
    if shape[: len(size)] != size or any(n != 1 for n in shape[len(size) :]) or 0 in size:
        return False
    if PIXEL_IDS.get(header.get_data_dtype().newbyteorder("=")) != reader.GetPixelID():
        return False
    slope, inter = (float(header[key]) for key in ("scl_slope", "scl_inter"))
    slope = slope if math.isfinite(slope) and abs(slope) >= ITK_EPSILON else 1.0
    inter = inter if math.isfinite(inter) else 0.0
    return slope == 1.0 and inter == 0.0


def _read_exactly(stream: _Stream, length: int) -> bytes | None:
    """The next `length` bytes of `stream`; None if it ends before."""
    buffer = bytearray(length)
    return bytes(buffer) if _read_fully(stream, memoryview(buffer)) == length else None


def _read_fully(stream: _Stream, buffer: memoryview) -> int:
    """Fill `buffer` from `stream`; the number of bytes read (fewer where the stream ends)."""
    done = 0
    try:
        while done < len(buffer):
            count = stream.readinto(buffer[done:])
            if not count:
                break
            done += count
    except EOFError:  # a compressed stream cut short
        pass
    return done


def _read_with_simpleitk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The reference reading: SimpleITK, then TorchIO's conversion, with the same checks."""
    _check_complete(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:  # SimpleITK's message ends with the reason
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        shear = _shear_degrees(path) if "orthonormal" in str(error) else None
        if shear is not None:
            raise CaseError(
                f"{path}: sheared voxel grid (its axes are {shear:.1f} degrees from orthogonal, "
                "e.g. a CT gantry tilt) is not supported: ITK, which reads images on the training "
                "side too (TorchIO), cannot represent it; resample it to an orthogonal grid first"
            ) from error
        raise CaseError(f"{path}: cannot read image ({lines[-1] if lines else error})") from error
    if image.GetDimension() not in (3, 4):
        raise CaseError(f"{path}: expected a 3-D or 4-D image, got {image.GetDimension()}-D")
    data, affine = sitk_to_nib(image, keepdim=True)  # [C, X, Y, Z]
    if _has_non_finite(path, data):
        raise CaseError(f"{path}: image holds NaN or infinite voxels")
    return data, affine


def _shear_degrees(path: Path) -> float | None:
    """How far the voxel axes of a NIfTI file are from orthogonal (the largest deviation of
    an angle between two axes from 90 degrees); None when nibabel cannot read the header."""
    try:
        axes = nib.load(str(path)).affine[:3, :3]
    except (ImageFileError, HeaderDataError, OSError, ValueError, EOFError):
        return None
    unit = axes / np.linalg.norm(axes, axis=0)
    cosines = np.abs(unit.T @ unit - np.eye(3))
    return float(np.degrees(np.arcsin(min(1.0, cosines.max()))))


def _check_complete(path: Path) -> None:
    """`CaseError` when a NIfTI file ends early: SimpleITK reads such a file without complaint,
    missing voxels (even part of the header) as 0. A .nii.gz whose gzip trailer records the
    length its header promises is complete; any other is decompressed to measure it."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    expected = _promised_bytes(path)
    if name.endswith(".nii"):
        length: int | None = path.stat().st_size
    elif expected is not None and _gzip_trailer(path) == expected % (1 << 32):
        return
    else:
        length = _gunzip_length(path)
    if length is not None and length < (expected or NIFTI1_HEADER_BYTES):
        what = f"{expected} bytes of NIfTI header and voxels" if expected else "a NIfTI header"
        raise CaseError(f"{path}: file is truncated (expected {what}; the file ends before)")
    if length is not None and expected is not None and length > expected:
        shape = nib.load(str(path)).shape
        raise CaseError(_more_data_than_header(path, shape, expected))


def _promised_bytes(path: Path) -> int | None:
    """Header plus voxel bytes the NIfTI header promises; None when nibabel cannot read it."""
    try:
        voxels = nib.load(str(path)).dataobj
    except (ImageFileError, HeaderDataError, OSError, ValueError, EOFError):
        return None
    return int(voxels.offset) + np.dtype(voxels.dtype).itemsize * math.prod(voxels.shape)


def _gzip_trailer(path: Path) -> int:
    """The gzip trailer's ISIZE: the decompressed length mod 2**32 (of the last member)."""
    with path.open("rb") as stream:
        stream.seek(-4, os.SEEK_END)
        return int.from_bytes(stream.read(4), "little")


def _gunzip_length(path: Path) -> int | None:
    """Decompressed length of a gzip file (of what there is when it ends early); None when it
    is no gzip data (SimpleITK's reader then says what is wrong)."""
    length = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                length += len(chunk)
    except EOFError:
        return length
    except (OSError, zlib.error):
        return None
    return length


def _has_non_finite(path: Path, data: np.ndarray) -> bool:
    """Whether the file holds NaN/Inf voxels. SimpleITK reads those as 0 from NIfTI files, so
    when `data` has zeros, a file nibabel can read is checked again raw."""
    if data.dtype.kind != "f":
        return False
    if not np.isfinite(data).all():
        return True
    if not (data == 0).any():
        return False
    try:
        raw = np.asarray(nib.load(str(path)).dataobj)
    except (ImageFileError, HeaderDataError, OSError, ValueError):
        return False
    return not np.isfinite(raw).all()


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """([C, X, Y, Z] float32 voxels, 4x4 RAS+ affine) of an image file; `CaseError` if unusable."""
    image = read_image(Path(path))
    return image.data.numpy().astype(np.float32, copy=False), image.affine


def load_label(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """([X, Y, Z] integer labels, 4x4 RAS+ affine) of a label file.

    Integer files keep their dtype; float files must hold whole numbers and are cast to the
    smallest integer type that fits. One channel only.
    """
    image = read_image(Path(path))
    affine = image.affine
    if image.num_channels != 1:
        raise CaseError(f"{path}: a label map has one channel, this file has {image.num_channels}")
    labels = image.data[0].numpy()
    if labels.dtype.kind in "iu":
        return labels, affine
    if not np.array_equal(labels, np.round(labels)):
        raise CaseError(f"{path}: label map holds non-integer values")
    low, high = int(labels.min()), int(labels.max())
    dtype = np.result_type(np.min_scalar_type(low), np.min_scalar_type(high))
    return labels.astype(dtype), affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write `data` [X, Y, Z] with `affine` as both sform and qform (code 1, scanner)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    with writing(path):
        nib.save(img, str(path))
