"""nifti_io.py: the fast NIfTI reader gives what `tio.ScalarImage(path)` gives, or steps aside.

Reference: `tio.ScalarImage(path)` for dtype, values and affine (compared exactly: the affine
with `np.array_equal`, not to a tolerance) and `sitk_to_nib(sitk.ReadImage(path))` for the
memory layout. Each written file also states whether the fast road must take it.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torchio as tio
from conftest import FIXTURE
from isal import isal_zlib
from torchio.data.io import sitk_to_nib

from evalharness.data.nifti_io import (
    _read_with_simpleitk,
    load_label,
    load_volume,
    read_image,
    read_nifti_fast,
)
from evalharness.demo.synthetic import affine_from_axcodes
from evalharness.errors import CaseError

SHAPE = (7, 6, 5)
SPACING = (0.9, 1.3, 2.1)


def volume(dtype=np.float32, shape=SHAPE, seed=0) -> np.ndarray:
    """Values spanning the dtype's range (both signs where it has them), with some zeros."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        data = rng.normal(0.0, 1e3, size=shape)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    data = data.astype(dtype)
    data.flat[::7] = 0
    return data


def oblique(axcodes: str = "LPS", degrees: float = 17.0) -> np.ndarray:
    affine = affine_from_axcodes(axcodes, SPACING, SHAPE)
    a, b = np.deg2rad(degrees), np.deg2rad(degrees / 3)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine[:3] = rz @ rx @ affine[:3]
    affine[:3, 3] += (12.5, -3.25, 40.0)
    return affine


def write(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray | None = None,
    *,
    qform: tuple[np.ndarray | None, int] | None = None,
    sform: tuple[np.ndarray | None, int] | None = None,
    endian: str = "<",
    version: int = 1,
    **fields: object,
) -> Path:
    """Write a NIfTI file; `qform`/`sform` (affine, code) default to `affine` with code 1, and
    `fields` overwrite raw header fields (e.g. scl_slope) after nibabel has written the file."""
    affine = affine_from_axcodes("LPS", SPACING, SHAPE) if affine is None else affine
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    image = klass(data, affine, header=klass.header_class(endianness=endian))
    image.header.set_data_dtype(data.dtype)
    image.set_qform(*(qform or (affine, 1)))
    image.set_sform(*(sform or (affine, 1)))
    raw = image.to_bytes()
    header = klass.header_class.from_fileobj(io.BytesIO(raw), check=False)
    for key, value in fields.items():
        header[key] = value
    raw = header.binaryblock + raw[len(header.binaryblock) :]
    path.write_bytes(gzip.compress(raw, compresslevel=1) if path.suffix == ".gz" else raw)
    return path


def assert_reads_like_torchio(path: Path, fast: bool) -> None:
    """`read_image(path)` equals `tio.ScalarImage(path)` bit for bit, with `sitk_to_nib`'s
    layout; and the fast road took the file exactly when `fast`."""
    assert (read_nifti_fast(path) is not None) == fast
    image = read_image(path)
    reference = tio.ScalarImage(path)
    assert image.data.dtype == reference.data.dtype
    assert np.array_equal(image.data.numpy(), reference.data.numpy())
    assert np.array_equal(image.affine, reference.affine)  # exactly, not to a tolerance
    layout, _ = sitk_to_nib(sitk.ReadImage(str(path)), keepdim=True)
    assert image.data.stride() == torch.as_tensor(layout).stride()  # the same memory layout


SUFFIXES = [".nii", ".nii.gz"]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(
    "dtype",
    [
        "u1",
        "i1",
        "<i2",
        ">i2",
        "<u2",
        "<i4",
        ">i4",
        "<u4",
        "<i8",
        "<u8",
        "<f4",
        ">f4",
        "<f8",
        ">f8",
    ],
)
def test_dtypes_and_byte_orders(tmp_path, suffix, dtype):
    dtype = np.dtype(dtype)
    endian = ">" if dtype.byteorder == ">" else "<"
    path = write(tmp_path / f"v{suffix}", volume(dtype.newbyteorder("=")), endian=endian)
    if dtype.byteorder == ">":
        assert nib.load(str(path)).header.endianness == ">"
    assert_reads_like_torchio(path, fast=True)


ORIENTATIONS = {
    "RAS": affine_from_axcodes("RAS", SPACING, SHAPE),
    "LPS": affine_from_axcodes("LPS", SPACING, SHAPE),
    "LAS": affine_from_axcodes("LAS", SPACING, SHAPE),
    "PIR": affine_from_axcodes("PIR", SPACING, SHAPE),
    "oblique LPS": oblique("LPS"),
    "oblique PIR": oblique("PIR", -33.0),
}


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_orientations(tmp_path, suffix, orientation):
    path = write(tmp_path / f"v{suffix}", volume(np.int16), ORIENTATIONS[orientation])
    assert_reads_like_torchio(path, fast=True)


SHEAR = ORIENTATIONS["LAS"] @ np.array([[1, 0.2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
GEOMETRIES = {  # qform (affine, code), sform (affine, code): ITK and nibabel disagree on some
    "qform only": ((ORIENTATIONS["oblique LPS"], 1), (None, 0)),
    "sform only": ((None, 0), (ORIENTATIONS["oblique PIR"], 2)),
    "neither": ((None, 0), (None, 0)),
    "qform 1 != sform 1": ((ORIENTATIONS["LPS"], 1), (ORIENTATIONS["oblique PIR"], 1)),
    "qform 1 != sform 2": ((ORIENTATIONS["RAS"], 1), (ORIENTATIONS["oblique LPS"], 2)),
    "qform 2 != sform 4": ((ORIENTATIONS["PIR"], 2), (ORIENTATIONS["LAS"], 4)),
    "qform 0 != sform 3": ((ORIENTATIONS["PIR"], 0), (ORIENTATIONS["LAS"], 3)),
    "sheared sform, qform 1": ((ORIENTATIONS["LPS"], 1), (SHEAR, 1)),
}


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_qform_and_sform_are_read_as_simpleitk_does(tmp_path, suffix, geometry):
    qform, sform = GEOMETRIES[geometry]
    path = write(tmp_path / f"v{suffix}", volume(np.float32), qform=qform, sform=sform)
    assert_reads_like_torchio(path, fast=True)


def test_nibabel_and_simpleitk_disagree_on_one_of_those_files(tmp_path):
    """The geometry is SimpleITK's: nibabel's affine would be wrong for the training side."""
    qform, sform = GEOMETRIES["qform 1 != sform 2"]
    path = write(tmp_path / "v.nii.gz", volume(np.float32), qform=qform, sform=sform)
    _, affine = read_nifti_fast(path)
    assert not np.allclose(affine, nib.load(str(path)).affine)
    assert np.array_equal(affine, tio.ScalarImage(path).affine)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(
    ("dtype", "fields", "fast"),
    [
        (np.int16, {"scl_slope": np.nan, "scl_inter": np.nan}, True),  # nibabel's default
        (np.int16, {"scl_slope": 0.0, "scl_inter": 0.0}, True),
        (np.int16, {"scl_slope": 1.0, "scl_inter": 0.0}, True),
        (np.int16, {"scl_slope": np.inf, "scl_inter": np.nan}, True),  # ITK: non-finite is 0
        (np.int16, {"scl_slope": 2.0, "scl_inter": 0.0}, False),
        (np.int16, {"scl_slope": 1.0, "scl_inter": -1024.0}, False),
        (np.int16, {"scl_slope": 0.0, "scl_inter": 5.0}, False),  # ITK adds 5, nibabel does not
        (np.uint8, {"scl_slope": 0.5, "scl_inter": 3.0}, False),
        (np.float32, {"scl_slope": 2.0, "scl_inter": 0.0}, False),
        (np.float64, {"scl_slope": 1.0, "scl_inter": 0.25}, False),
    ],
)
def test_scaled_files_are_read_the_reference_way(tmp_path, suffix, dtype, fields, fast):
    path = write(tmp_path / f"v{suffix}", volume(dtype), **fields)
    assert_reads_like_torchio(path, fast=fast)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_four_d_files(tmp_path, suffix, channels):
    path = write(tmp_path / f"v{suffix}", volume(np.float32, (*SHAPE, channels)))
    assert_reads_like_torchio(path, fast=True)
    assert read_image(path).data.shape == (channels, *SHAPE)


def test_nifti2_files_step_aside(tmp_path):
    """This SimpleITK does not read NIfTI-2: the reference reader's error stands."""
    for suffix in SUFFIXES:
        path = write(tmp_path / f"v{suffix}", volume(np.int32), oblique("PIR"), version=2)
        assert read_nifti_fast(path) is None
        with pytest.raises(CaseError) as error:
            read_image(path)
        assert str(error.value) == reference_error(path)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_extensions_and_padding_before_the_voxels(tmp_path, suffix):
    data = volume(np.int16)
    image = nib.Nifti1Image(data, ORIENTATIONS["PIR"])
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 200))
    with_extension = tmp_path / f"ext{suffix}"
    nib.save(image, str(with_extension))
    raw = with_extension.read_bytes()
    raw = gzip.decompress(raw) if suffix == ".nii.gz" else raw
    assert nib.Nifti1Header(raw[:348])["vox_offset"] > 352
    assert_reads_like_torchio(with_extension, fast=True)
    raw = write(tmp_path / "plain.nii", data, vox_offset=1024).read_bytes()
    raw = raw[:352] + bytes(1024 - 352) + raw[352:]  # voxels moved to where the header says
    padded = tmp_path / f"padded{suffix}"
    padded.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
    assert_reads_like_torchio(padded, fast=True)
    assert np.array_equal(read_image(padded).data[0].numpy(), data)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_files_simpleitk_reads_otherwise_step_aside(tmp_path, suffix):
    """RGB and complex voxels, 5-D vectors, 2-D images: the reference reader decides."""
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"] = volume(np.uint8)
    cases = {
        "rgb": write(tmp_path / f"rgb{suffix}", rgb),
        "complex": write(tmp_path / f"c{suffix}", volume(np.float32) * (1 + 2j)),
        "vector": write(
            tmp_path / f"vec{suffix}", volume(np.float32, (*SHAPE, 1, 3)), intent_code=1007
        ),
    }
    for path in cases.values():
        assert read_nifti_fast(path) is None
        try:
            expected = _read_with_simpleitk(path)
        except CaseError as error:
            with pytest.raises(CaseError, match="^" + str(error).replace(".", r"\.") + "$"):
                read_image(path)
        else:
            assert_reads_like_torchio(path, fast=False)
            assert np.array_equal(read_image(path).data.numpy(), expected[0])
    flat = write(tmp_path / f"flat{suffix}", volume(np.float32, (7, 6)))
    assert read_nifti_fast(flat) is None
    with pytest.raises(CaseError, match="3-D or 4-D"):
        read_image(flat)


def test_other_formats_step_aside(tmp_path):
    image = sitk.GetImageFromArray(volume(np.int16).transpose())
    image.SetSpacing(SPACING)
    image.SetOrigin((3.0, -2.0, 1.5))
    for name in ("v.nrrd", "v.mha"):
        sitk.WriteImage(image, str(tmp_path / name))
        assert_reads_like_torchio(tmp_path / name, fast=False)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_headers_nibabel_rejects_step_aside(tmp_path, suffix):
    """Files nibabel's checks refuse (vox_offset too low, pair magic in a single file, an
    unknown datatype): the reference reader reads them or says what is wrong."""
    data = volume(np.int16)
    for name, fields in {
        "low_offset": {"vox_offset": 348},
        "pair_magic": {"magic": b"ni1"},
        "datatype": {"datatype": 9999},
    }.items():
        path = write(tmp_path / f"{name}{suffix}", data, **fields)
        assert read_nifti_fast(path) is None, name
        try:
            expected, _ = _read_with_simpleitk(path)
        except CaseError:
            with pytest.raises(CaseError, match=name):
                read_image(path)
        else:
            assert np.array_equal(read_image(path).data.numpy(), expected)


def test_garbage_and_corrupt_data_step_aside(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not an image")
    assert read_nifti_fast(garbage) is None
    with pytest.raises(CaseError, match="garbage.nii.gz: cannot read image"):
        read_image(garbage)
    path = write(tmp_path / "corrupt.nii.gz", volume(np.float32, (40, 40, 20)))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)  # deflate data no longer decodes
    path.write_bytes(bytes(raw))
    assert read_nifti_fast(path) is None


def reference_error(path: Path) -> str:
    with pytest.raises(CaseError) as error:
        _read_with_simpleitk(path)
    return str(error.value)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("keep", [0.3, 0.9, 1.0])
def test_truncated_files_raise_as_before(tmp_path, suffix, keep):
    """A file cut within the voxels (or by one byte); `read_nifti_fast` itself raises, with the
    reference reader's very message."""
    path = tmp_path / f"cut{suffix}"
    raw = write(tmp_path / "whole.nii", volume(np.float32, (40, 30, 20))).read_bytes()
    raw = raw[: int(len(raw) * keep) - (keep == 1.0)]
    path.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
    message = reference_error(path)
    assert "file is truncated (expected 96352 bytes of NIfTI header and voxels" in message
    with pytest.raises(CaseError) as error:
        read_nifti_fast(path)
    assert str(error.value) == message
    with pytest.raises(CaseError) as error:
        read_image(path)
    assert str(error.value) == message


def test_cut_compressed_stream_and_cut_header_raise_as_before(tmp_path):
    raw = write(tmp_path / "v.nii.gz", volume(np.float32, (40, 30, 20))).read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])  # the gzip stream itself ends early
    with pytest.raises(CaseError) as error:
        read_image(cut)
    assert str(error.value) == reference_error(cut)
    assert "expected 96352 bytes" in str(error.value)
    header_only = tmp_path / "header.nii"
    header_only.write_bytes(gzip.decompress(raw)[:200])
    assert read_nifti_fast(header_only) is None
    with pytest.raises(CaseError, match="expected a NIfTI header") as error:
        read_image(header_only)
    assert str(error.value) == reference_error(header_only)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f8"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_raise_as_before(tmp_path, suffix, dtype, value):
    dtype = np.dtype(dtype)
    data = volume(dtype.newbyteorder("="))
    data[3, 2, 1] = value
    path = write(
        tmp_path / f"v{suffix}", data, endian=dtype.byteorder if dtype.byteorder in "<>" else "<"
    )
    message = reference_error(path)
    assert message == f"{path}: image holds NaN or infinite voxels"
    with pytest.raises(CaseError) as error:
        read_nifti_fast(path)
    assert str(error.value) == message


@pytest.mark.parametrize("kind", ["imagesTr", "labelsTr"])
@pytest.mark.parametrize("case", ["la_001", "la_005"])
def test_fixture_images_of_a_real_training_run(kind, case):
    path = FIXTURE / "Task02_HeartSynth" / kind / f"{case}.nii.gz"
    assert_reads_like_torchio(path, fast=True)


def test_without_isals_private_reader_the_public_call_serves(tmp_path, monkeypatch):
    """Should a python-isal release drop `_GzipReader`, .nii.gz files still take the fast road
    (through `igzip.decompress`), and a cut file still fails with the reference message."""
    monkeypatch.delattr(isal_zlib, "_GzipReader")
    path = write(tmp_path / "v.nii.gz", volume(np.float32))
    assert_reads_like_torchio(path, fast=True)
    raw = write(tmp_path / "whole.nii", volume(np.float32, (40, 30, 20))).read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    message = reference_error(cut)
    with pytest.raises(CaseError) as error:
        read_image(cut)
    assert str(error.value) == message


def test_result_is_writable_and_owns_no_shared_buffer(tmp_path):
    path = write(tmp_path / "v.nii.gz", volume(np.float32))
    data, _ = read_nifti_fast(path)
    assert data.flags.writeable
    data += 1  # a read-only or shared buffer would fail or leak here
    assert np.array_equal(read_nifti_fast(path)[0] + 1, data)


def test_load_volume_moves_channels_first(tmp_path):
    data = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    affine = np.diag([-1.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "v.nii.gz"))
    loaded, read_affine = load_volume(tmp_path / "v.nii.gz")
    assert loaded.dtype == np.float32
    assert np.array_equal(loaded, np.moveaxis(data, -1, 0))
    assert np.allclose(read_affine, affine)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((4, 4), np.float32), "3-D or 4-D"),
        (np.full((4, 4, 4), np.nan, np.float32), "NaN"),
        (np.where(np.eye(4, dtype=bool)[..., None], np.inf, 1.0).astype(np.float32), "infinite"),
    ],
)
def test_load_volume_rejects_bad_files(tmp_path, data, message):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(CaseError, match=message) as error:
        load_volume(path)
    assert str(path) in str(error.value)


def test_load_volume_rejects_unreadable_file(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"not an image")
    with pytest.raises(CaseError, match="garbage.nii.gz"):
        load_volume(path)


def test_load_label_checks_integers(tmp_path):
    labels = np.zeros((4, 4, 4), np.float32)
    labels[1:3, 1:3, 1:3] = 2.0
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "ok.nii.gz"))
    read, _ = load_label(tmp_path / "ok.nii.gz")
    assert read.dtype.kind in "iu" and np.array_equal(read, labels)
    labels[0, 0, 0] = 0.5
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "bad.nii.gz"))
    with pytest.raises(CaseError, match="bad.nii.gz.*non-integer"):
        load_label(tmp_path / "bad.nii.gz")
