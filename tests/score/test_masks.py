"""Tests of evalharness.score.masks: labelling and keep-largest-component, on both of its paths
(the run graph and voxel labelling, cc3d), against one plain labelling
of the whole volume by scipy."""

from __future__ import annotations

import itertools
import tracemalloc

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from evalharness.score import masks
from evalharness.score.masks import keep_largest_component

DIRECTIONS = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]


def box_mask(shape: tuple[int, int, int], start: tuple[int, ...], stop: tuple[int, ...]):
    """Bool [X, Y, Z] with the box [start, stop) set."""
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))] = True
    return mask


def voxels(shape: tuple[int, int, int], *points: tuple[int, int, int]) -> np.ndarray:
    """Bool [X, Y, Z] with the given voxels set."""
    mask = np.zeros(shape, dtype=bool)
    for point in points:
        mask[point] = True
    return mask


def largest_by_whole_volume_labelling(mask: np.ndarray) -> np.ndarray:
    """The reference: one scipy labelling of the whole volume, the largest label (the smallest
    label, i.e. the first in raster order, on a tie)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == np.argmax(sizes)


def smooth_mask(
    rng: np.random.Generator, shape: tuple[int, ...], level: float, sigma: float = 1.2
) -> np.ndarray:
    """Blobs (long runs, a few per row), like a trained model's prediction."""
    return ndimage.gaussian_filter(rng.normal(size=shape), sigma=sigma) > level


def ellipsoid(shape: tuple[int, ...], center: tuple[int, ...], radii: tuple[int, ...]):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii, strict=True)) <= 1


def spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[object]:
    """Record the results of masks.<name> (None: that path gave up)."""
    results: list[object] = []
    original = getattr(masks, name)

    def recorded(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(masks, name, recorded)
    return results


def spy_cc3d(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Record the shapes cc3d was asked to label (it still labels them)."""
    shapes: list[tuple[int, ...]] = []
    original = cc3d.connected_components

    def recorded(data, *args, **kwargs):
        shapes.append(data.shape)
        return original(data, *args, **kwargs)

    monkeypatch.setattr(cc3d, "connected_components", recorded)
    return shapes


@pytest.fixture(params=["runs", "cc3d", "scipy"])
def path(request, monkeypatch):
    """Force one path of keep_largest_component (the run graph, or labelling voxels with cc3d
    or with scipy); afterwards check it was the one taken."""
    if request.param == "runs":
        monkeypatch.setattr(masks, "_MAX_RUNS_PER_VOXEL", 1.0)
        monkeypatch.setattr(masks, "_CANDIDATES_PER_VOXEL", np.inf)
    else:
        monkeypatch.setattr(masks, "_MAX_RUNS_PER_VOXEL", 0.0)
        minimum = 0 if request.param == "cc3d" else np.inf
        monkeypatch.setattr(masks, "_CC3D_MIN_VOXELS", minimum)
    by_runs = spy(monkeypatch, "_largest_by_runs")
    by_labelling = spy(monkeypatch, "_largest_by_labelling")
    by_cc3d = spy_cc3d(monkeypatch)
    yield request.param
    if request.param == "runs":
        assert by_runs and not by_labelling and all(r is not None for r in by_runs)
    else:
        assert by_labelling and not by_runs
        if request.param == "scipy":
            assert not by_cc3d
        elif "one_voxel_wide" not in request.node.name:  # flat boxes never go to cc3d
            assert by_cc3d


def assert_keeps_the_largest(mask: np.ndarray) -> np.ndarray:
    largest = keep_largest_component(mask)
    expected = largest_by_whole_volume_labelling(np.asarray(mask) != 0)
    assert largest.dtype == bool and largest.shape == mask.shape
    np.testing.assert_array_equal(largest, expected)
    return largest


# --- keep_largest_component on every path --------------------------------------------------


def test_matches_whole_volume_labelling_on_random_masks(path):
    """Speckle of every density (ties galore at low density), small shapes including axes one
    voxel wide, C and Fortran order, bool and uint8."""
    rng = np.random.default_rng(20)
    for i in range(240):
        shape = tuple(int(n) for n in rng.integers(1, 10, size=3))
        density = rng.choice([0.03, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9])
        mask = rng.random(shape) < density
        if i % 2:
            mask = mask.astype(np.uint8) * rng.integers(1, 4, size=shape, dtype=np.uint8)
        if i % 3 == 1:
            mask = np.asfortranarray(mask)
        assert_keeps_the_largest(mask)


@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (1, 1, 9), (1, 9, 1), (9, 1, 1), (1, 7, 8), (7, 1, 8), (7, 8, 1)]
)
def test_matches_whole_volume_labelling_with_axes_one_voxel_wide(path, shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.2, 0.5, 0.8):
        for _ in range(5):
            assert_keeps_the_largest(rng.random(shape) < density)


def test_matches_whole_volume_labelling_on_smooth_masks(path):
    """Long runs, several per row, components that merge and split along every axis."""
    rng = np.random.default_rng(21)
    for shape in ((30, 24, 20), (9, 40, 33), (40, 7, 25), (16, 16, 70)):
        for level in (-0.3, 0.0, 0.2, 0.4):
            mask = smooth_mask(rng, shape, level)
            assert_keeps_the_largest(mask)
            assert_keeps_the_largest(np.asfortranarray(mask).astype(np.uint8))


def test_empty_and_full_masks(path):
    for shape in ((1, 1, 1), (3, 4, 5), (6, 1, 7)):
        empty = keep_largest_component(np.zeros(shape, dtype=np.uint8))
        assert empty.dtype == bool and empty.shape == shape and not empty.any()
        assert keep_largest_component(np.ones(shape, dtype=bool)).all()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_a_diagonal_chain_is_one_component_in_every_direction(path, direction):
    """p, p + d, p + 2d touch only through d: 3 voxels, beating a face-connected pair."""
    d = np.array(direction)
    start = np.array([3, 3, 3]) - d
    chain = voxels((7, 7, 7), *(tuple(start + k * d) for k in range(3)))
    pair = voxels((7, 7, 7), (0, 0, 0), (0, 0, 1))
    np.testing.assert_array_equal(assert_keeps_the_largest(chain | pair), chain)


@pytest.mark.parametrize("gap", [0, 1])
@pytest.mark.parametrize("dx, dy", [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)])
def test_runs_touch_when_their_z_intervals_meet_at_a_corner(path, gap, dx, dy):
    """Runs z in [2, 5) of row (3, 3) and [5 + gap, 8 + gap) of row (3 + dx, 3 + dy): one
    component of 6 voxels when they meet corner to corner (gap 0; both orders of the rows), two
    of 3 otherwise; a straight line of 5 lies between the two answers."""
    shape = (7, 7, 12)
    first = box_mask(shape, (3, 3, 2), (4, 4, 5))
    second = box_mask(shape, (3 + dx, 3 + dy, 5 + gap), (4 + dx, 4 + dy, 8 + gap))
    line = box_mask(shape, (0, 0, 0), (5, 1, 1))
    expected = first | second if gap == 0 else line  # (0, 0) and gap 0: one run of 6
    np.testing.assert_array_equal(assert_keeps_the_largest(first | second | line), expected)


@pytest.mark.parametrize(
    "piece_a, piece_b",
    [
        # rows (x, Y - 1) and (x + 1, 0) follow each other in raster order
        (((1, 4, 2), (2, 5, 4)), ((2, 0, 2), (3, 1, 4))),
        # (x, 0) and (x, Y - 1): Y - 1 rows apart, as (x, y) and (x + 1, y - 1)
        (((1, 0, 2), (2, 1, 4)), ((1, 4, 2), (2, 5, 4))),
        # (x, Y - 1) and (x + 2, 0): Y + 1 rows apart, as (x, y) and (x + 1, y + 1)
        (((1, 4, 2), (2, 5, 4)), ((3, 0, 2), (4, 1, 4))),
        # the last Z voxel of a row and the first of the next one are flat neighbours
        (((1, 2, 4), (2, 3, 6)), ((1, 3, 0), (2, 4, 2))),
        # the last voxel of a plane and the first of the next one
        (((1, 4, 4), (2, 5, 6)), ((2, 0, 0), (3, 1, 2))),
    ],
)
def test_no_component_wraps_around_a_y_or_z_border(path, piece_a, piece_b):
    """Two pieces of 2 voxels, neighbours only if rows or columns wrapped around; a line of 3
    beats each of them, not their wrong union of 4."""
    shape = (6, 5, 6)
    a, b = box_mask(shape, *piece_a), box_mask(shape, *piece_b)
    line = box_mask(shape, (5, 2, 1), (6, 3, 4))
    assert np.count_nonzero(a) == np.count_nonzero(b) == 2
    mask = a | b | line
    mask[4, 0, 5] = mask[4, 4, 0] = True  # single voxels: the bounding box spans Y and Z
    np.testing.assert_array_equal(assert_keeps_the_largest(mask), line)


def test_ties_go_to_the_first_in_raster_order(path):
    """Of two equal cubes the first wins; a U whose arms join only at a later plane ties with a
    line starting later and wins; a chain through every plane beats a bigger-looking blob."""
    shape = (16, 8, 8)
    chain = np.zeros(shape, dtype=bool)
    chain[np.arange(16), np.arange(16) % 2, np.arange(16) % 2] = True  # 16 voxels
    blob = box_mask(shape, (4, 4, 4), (7, 7, 6))
    blob[6, 6, 5] = blob[6, 5, 5] = blob[5, 6, 5] = False  # 15 voxels
    u_shape = box_mask(shape, (0, 0, 0), (5, 1, 1)) | box_mask(shape, (0, 2, 0), (5, 3, 1))
    u_shape[5, 1, 0] = True  # 11 voxels, the arms joined at x = 5
    line = box_mask(shape, (5, 6, 6), (16, 7, 7))  # 11 voxels, first voxel later
    first_cube = box_mask(shape, (2, 4, 0), (4, 6, 2))
    cubes = box_mask(shape, (9, 4, 0), (11, 6, 2)) | first_cube
    for mask, expected in ((chain | blob, chain), (u_shape | line, u_shape), (cubes, first_cube)):
        np.testing.assert_array_equal(assert_keeps_the_largest(mask), expected)
        assert_keeps_the_largest(mask[::-1, ::-1, ::-1])  # other ties, other winners


def test_strided_views(path):
    rng = np.random.default_rng(22)
    mask = smooth_mask(rng, (30, 20, 24), 0.1)
    for view in (mask[::2], mask[:, ::-1], mask[1:-3, 2:, ::3], mask.transpose(2, 0, 1)):
        assert_keeps_the_largest(view)


# --- the choice of path ----------------------------------------------------------------------


def test_smooth_masks_take_the_run_graph_and_speckle_is_labelled(monkeypatch):
    by_runs = spy(monkeypatch, "_largest_by_runs")
    by_labelling = spy(monkeypatch, "_largest_by_labelling")
    rng = np.random.default_rng(23)
    assert_keeps_the_largest(smooth_mask(rng, (40, 40, 30), 0.0, sigma=6.0))
    assert len(by_runs) == 1 and by_runs[0] is not None and not by_labelling
    assert_keeps_the_largest(rng.random((40, 40, 30)) < 0.5)  # runs of ~2 voxels
    assert len(by_runs) == 1 and len(by_labelling) == 1


def test_too_many_candidate_run_pairs_fall_back_to_labelling(monkeypatch):
    """Few runs overall but many per row (candidate pairs grow with their square)."""
    monkeypatch.setattr(masks, "_MAX_RUNS_PER_VOXEL", 1.0)
    monkeypatch.setattr(masks, "_CANDIDATES_PER_VOXEL", 0.05)
    by_runs = spy(monkeypatch, "_largest_by_runs")
    by_labelling = spy(monkeypatch, "_largest_by_labelling")
    mask = np.zeros((20, 20, 40), dtype=bool)
    mask[8:12, 8:12, ::2] = True  # 20 runs in each of 16 rows
    mask[0, 0, :5] = True
    assert_keeps_the_largest(mask)
    assert by_runs == [None] and len(by_labelling) == 1


@pytest.mark.parametrize(
    "shape", [(3, 3, 3), (3, 3, 1), (1, 3, 3), (5, 5, 1), (63, 63, 1), (2, 63, 63), (9, 9, 9)]
)
def test_boxes_crowded_with_single_voxels_are_labelled(monkeypatch, shape):
    """Dots two apart: as many components as a box can hold. cc3d 4.1 raises on several of
    these small or flat boxes; keep-largest still answers (the first dot: all tie)."""
    monkeypatch.setattr(masks, "_MAX_RUNS_PER_VOXEL", 0.0)
    monkeypatch.setattr(masks, "_CC3D_MIN_VOXELS", 0)  # offer every box to cc3d
    mask = np.zeros(shape, dtype=bool)
    mask[::2, ::2, ::2] = True
    largest = assert_keeps_the_largest(mask)
    assert np.count_nonzero(largest) == 1 and largest.flat[0]


def test_run_graph_memory_is_a_few_bytes_per_voxel():
    """Two overlapping balls filling half the volume take the run path, which allocates the
    changes along Z and the result (bool each) plus a little per run, not int32 labels."""
    mask = ellipsoid((96, 96, 64), (35, 45, 32), (34, 40, 36))
    mask |= ellipsoid((96, 96, 64), (65, 50, 32), (30, 40, 36))
    mask[0, 0, 0] = mask[-1, -1, -1] = True  # the box is the volume
    assert 0.4 < mask.mean() < 0.6
    tracemalloc.start()
    try:
        largest = keep_largest_component(mask)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(largest, largest_by_whole_volume_labelling(mask))
    assert peak < 3 * mask.size
