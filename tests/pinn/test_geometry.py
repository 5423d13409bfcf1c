import subprocess
import sys

import numpy as np
import pytest
import torch

from pinnsketch.pinn import geometry as G
from pinnsketch.pinn.geometry import SAMPLERS


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_space_time_sampling_shapes_and_membership(sampler):
    d = G.Interval(-1, 1) * G.TimeDomain(0, 1)
    assert d.dim == 2 and d.input_names == ("x", "t") and d.has_time
    x = d.sample_domain(64, sampler, gen())
    b = d.sample_boundary(16, sampler, gen())
    i = d.sample_initial(8, sampler, gen())
    assert x.shape[1] == 2 and abs(len(x) - 64) <= 8 and x.dtype == np.float64
    assert b.shape == (16, 2) and i.shape == (8, 2)
    assert d.inside(x).all() and d.inside(b).all()
    assert np.allclose(np.abs(b[:, 0]), 1) and np.all(i[:, 1] == 0)


@pytest.mark.parametrize("domain, names", [
    (G.Rectangle((0, 0), (2, 1)), ("x", "y")),
    (G.Disk((0, 0), 1), ("x", "y")),
    (G.Polygon([[0, 0], [2, 0], [2, 1], [1, 2], [0, 1]]), ("x", "y")),
    (G.Polygon([[0, 0], [1, 0], [0, 1]]), ("x", "y")),
    (G.Cuboid((0, 0, 0), (1, 1, 1)), ("x", "y", "z")),
    (G.Sphere((0, 0, 0), 1), ("x", "y", "z")),
])
def test_spatial_domains(domain, names):
    x = domain.sample_domain(100, "random", gen())
    b = domain.sample_boundary(40, "random", gen())
    assert x.shape == (100, len(names)) and domain.input_names == names
    assert domain.inside(x).all() and domain.on_boundary(b).all()
    n = domain.boundary_normal(b)
    assert np.allclose(np.linalg.norm(n, axis=1), 1)


def test_csg_and_normals_point_out_of_the_domain():
    d = G.Rectangle((0, 0), (1, 1)) - G.Disk((0.5, 0.5), 0.25)
    x = d.sample_domain(300, "hammersley", gen())
    assert (np.linalg.norm(x - 0.5, axis=1) >= 0.25 - 1e-12).all() and d.inside(x).all()
    b = d.sample_boundary(200, "random", gen())
    n = d.boundary_normal(b)
    # stepping a little along the outward normal leaves the domain
    assert not d.inside(b + 1e-3 * n).any()
    u = G.Disk((0, 0), 1) | G.Disk((1.5, 0), 1)
    assert u.inside(np.array([[-0.9, 0], [2.4, 0]])).all()
    both = G.Disk((0, 0), 1) & G.Rectangle((0, -1), (1, 1))
    assert (both.sample_domain(50, "random", gen())[:, 0] >= 0).all()
    assert "-" in repr(d) and "|" in repr(u) and "&" in repr(both)


def test_sampling_is_reproducible_from_the_generator_and_restores_numpy_state():
    d = G.Disk((0, 0), 1) * G.TimeDomain(0, 2)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = d.sample_domain(50, "random", gen(1))
    b = d.sample_domain(50, "random", gen(1))
    c = d.sample_domain(50, "random", gen(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.random.get_state()[1], before)
    assert torch.get_default_device() == torch.device("cpu")


@pytest.mark.parametrize("make, match", [
    (lambda: G.Interval(1, 1), "empty"),
    (lambda: G.Rectangle((0, 0), (1, 0)), "empty"),
    (lambda: G.Disk((0, 0), 0), "radius"),
    (lambda: G.Polygon([[0, 0], [1, 1], [2, 2]]), "zero area"),
    (lambda: G.Rectangle((0, 0, 0), (1, 1, 1)), "2 coordinates"),
    (lambda: G.Interval(0, 1) * G.Interval(0, 1), "TimeDomain"),
    (lambda: G.Interval(0, 1) | G.Disk((0, 0), 1), "dim"),
])
def test_bad_domains_are_rejected_with_the_fix(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_unknown_sampler():
    with pytest.raises(ValueError, match="hammersley"):
        G.Interval(0, 1).sample_domain(10, "grid")


def test_import_pinnsketch_does_not_import_deepxde():
    code = "import sys, pinnsketch, pinnsketch.pinn; print('deepxde' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and out.stderr == ""


L_SHAPE = G.Rectangle((-1, -1), (1, 1)) - G.Rectangle((0, 0), (1, 1))


@pytest.mark.parametrize("sampler", ["hammersley", "random", "uniform"])
def test_difference_boundary_points_lie_on_the_difference(sampler):
    # deepxde alone puts ~28 % of the L's boundary points on the removed square's outer edges
    x = L_SHAPE.sample_boundary(2000, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert len(x) == 2000 and L_SHAPE.on_boundary(x).all()
    assert not ((x[:, 0] > 1e-9) & (x[:, 1] > 1e-9)).any()          # nothing in the removed quadrant
    inner = np.isclose(x[:, 0], 0) | np.isclose(x[:, 1], 0)        # the re-entrant edges (deepxde: n per part)
    assert 0.15 < inner.mean() < 0.5
    space_time = (L_SHAPE * G.TimeDomain(0, 1)).sample_boundary(500, generator=torch.Generator().manual_seed(0))
    assert not ((space_time[:, 0] > 1e-9) & (space_time[:, 1] > 1e-9)).any()


def test_union_boundary_points_skip_the_faces_where_the_parts_touch():
    union = G.Rectangle((0, 0), (1, 1)) | G.Rectangle((1, 0), (2, 1))
    x = union.sample_boundary(1000, sampler="random", generator=torch.Generator().manual_seed(0))
    assert len(x) == 1000
    assert not (np.isclose(x[:, 0], 1) & (x[:, 1] > 1e-9) & (x[:, 1] < 1 - 1e-9)).any()
    ring = G.Disk((0, 0), 1) - G.Disk((0, 0), 0.5)                  # curved edges keep every point
    r = np.linalg.norm(ring.sample_boundary(500, generator=torch.Generator().manual_seed(0)), axis=1)
    assert (np.isclose(r, 1) | np.isclose(r, 0.5)).all() and 0.1 < np.isclose(r, 0.5).mean() < 0.6


@pytest.mark.parametrize("sampler", ["hammersley", "halton", "sobol", "lhs", "random"])
def test_csg_interior_points_are_distinct_and_inside(sampler):
    """deepxde redraws a CSG interior until it has n points; a quasi-random sampler redraws the same
    set, so a quarter of an L-shape's points were duplicates, and n = 1 never ended (the one point
    falls in the removed quadrant)."""
    for n in (1, 3, 500):
        x = L_SHAPE.sample_domain(n, sampler=sampler, generator=gen())
        assert x.shape == (n, 2) and len(np.unique(x, axis=0)) == n
        assert L_SHAPE.inside(x).all() and not ((x[:, 0] > 0) & (x[:, 1] > 0)).any()
    x = L_SHAPE.sample_domain(3000, sampler=sampler, generator=gen())
    quadrants = [((x[:, 0] < 0) & (x[:, 1] < 0)).mean(), ((x[:, 0] < 0) & (x[:, 1] > 0)).mean(),
                 ((x[:, 0] > 0) & (x[:, 1] < 0)).mean()]
    assert np.allclose(quadrants, 1 / 3, atol=0.03)                # spread over the whole L
    union = (G.Disk((0, 0), 1) | G.Rectangle((0.5, -0.2), (2, 0.2))) * G.TimeDomain(0, 1)
    y = union.sample_domain(400, sampler=sampler, generator=gen())
    assert y.shape == (400, 3) and len(np.unique(y, axis=0)) == 400
