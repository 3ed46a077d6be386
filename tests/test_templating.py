"""Implant library, meshes, outlines, automatic plan and plan changes, with known answers."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest

from inference.cli import run as cli_run
from inference.mesh import read_stl
from inference.geometry import CArmView, project_points, projection_matrix
from inference.io import read_json_object
from inference.templating import library as lib
from inference.templating import meshes
from inference.templating import plan as planning
from templating_helpers import (LESSER_TROCHANTER_Z_MM, canal_width_mm, MIRROR_X, analytic_measurements,
                                analytic_volumes, atlas_case, rigid_pose, write_case_out)


@pytest.fixture(scope="module")
def library():
    return lib.load_library()


@pytest.fixture(scope="module")
def analytic():
    hu, labels, geometry = analytic_volumes()
    native = planning.native_hip_from_measurements(analytic_measurements())
    return dataclasses.replace(native, canal=planning.canal_profile(hu, labels, geometry, native))


# ---------------------------------------------------------------------------------------- library
def test_shipped_library_is_the_generic_design(library):
    stem, cup = library.stem(), library.cup()
    assert len(stem.sizes) == 10
    assert sorted(v.neck_shaft_angle_deg for v in stem.variants) == [125, 125, 135, 135]
    assert stem.head_offsets_mm == (-3.5, 0.0, 3.5, 7.0) and stem.head_diameters_mm == (28.0, 32.0, 36.0)
    assert [c.outer_diameter_mm for c in cup.sizes] == list(np.arange(44.0, 67.0, 2.0))
    # The shipped files are exactly what the generator writes (no hand edits drift from the docs).
    for data in (lib.generic_stem_family(), lib.generic_cup_family()):
        shipped = json.loads((lib.implants_dir() / f"{data['id']}.json").read_text())
        assert shipped == json.loads(json.dumps(data))


def test_head_centre_follows_offset_and_neck_angle(library):
    stem = library.stem()
    for variant in stem.variants:
        a = math.radians(variant.neck_shaft_angle_deg)
        for h in stem.head_offsets_mm:
            c = stem.head_centre_mm("5", variant.name, h)
            assert c[0] == pytest.approx(stem.size("5").offset_mm[variant.name] + h * math.sin(a), abs=1e-9)
            assert c[1] == 0.0
            # the head centre lies on the neck axis through (0, 0, neck_axis_height)
            assert math.degrees(math.atan2(c[0], stem.size("5").neck_axis_height_mm - c[2])) == \
                pytest.approx(variant.neck_shaft_angle_deg, abs=1e-9)


def _bad(mutate, data=None):
    data = copy.deepcopy(data or lib.generic_stem_family())
    mutate(data)
    return data


MALFORMED = [
    ("format", lambda d: d.update(format="hipatlas-implant/9"), "format must be"),
    ("kind", lambda d: d.update(kind="knee"), "kind must be 'stem' or 'cup'"),
    ("missing id", lambda d: d.pop("id"), "id is missing"),
    ("negative length", lambda d: d["sizes"][2].update(length_mm=-5), "sizes[2].length_mm must be a number"),
    ("text width", lambda d: d["sizes"][0]["body"][1].update(ml_width_mm="12"), "sizes[0].body[1].ml_width_mm"),
    ("body order", lambda d: d["sizes"][1]["body"].reverse(), "sizes[1].body[].height_mm must be increasing"),
    ("offset per variant", lambda d: d["sizes"][3]["offset_mm"].pop("125 high"), "sizes[3].offset_mm must be"),
    ("duplicate size", lambda d: d["sizes"][1].update(size="1"), "distinct size labels"),
    ("head offsets", lambda d: d.update(head_offsets_mm=[0, 0]), "head_offsets_mm must be a list without"),
    ("nan", lambda d: d.update(neck_diameter_mm=float("nan")), "neck_diameter_mm must be a number"),
]


@pytest.mark.parametrize("name,mutate,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_stem_template_gives_one_clear_message(tmp_path, name, mutate, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_bad(mutate)))
    with pytest.raises(lib.ImplantTemplateError) as err:
        lib.load_library(tmp_path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_malformed_cup_and_files_are_refused(tmp_path):
    cup = lib.generic_cup_family()
    cup["sizes"][0]["head_diameters_mm"] = [40.0]  # larger than the 38 mm inside of a 44 mm shell
    (tmp_path / "cup.json").write_text(json.dumps(cup))
    with pytest.raises(lib.ImplantTemplateError, match=r"sizes\[0\].head_diameters_mm must be at most the inner"):
        lib.load_library(tmp_path)
    (tmp_path / "cup.json").write_text("{ not json")
    with pytest.raises(lib.ImplantTemplateError, match="not valid JSON"):
        lib.load_library(tmp_path)
    (tmp_path / "cup.json").write_text(json.dumps(lib.generic_cup_family()))
    (tmp_path / "cup2.json").write_text(json.dumps(lib.generic_cup_family()))
    with pytest.raises(lib.ImplantTemplateError, match="already used"):
        lib.load_library(tmp_path)


def test_cli_exits_2_with_one_line_for_a_malformed_template(tmp_path, capsys):
    (tmp_path / "t.json").write_text(json.dumps(_bad(lambda d: d.pop("taper"))))
    assert cli_run(["plan", str(tmp_path), "--out", str(tmp_path / "p"), "--implants", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "taper is missing" in err[0]


# ----------------------------------------------------------------------------------------- meshes
def test_meshes_are_closed_with_the_analytic_volume(library):
    stem, cup = library.stem(), library.cup()
    parts = meshes.stem_meshes(stem, "4", "135 standard", 3.5, 32.0)
    for mesh in parts.values():
        assert mesh.is_closed and mesh.signed_volume_mm3() > 0
    # A polyhedron inscribed in a sphere: within 2 % of 4/3 pi r^3 at 32 points per ring.
    assert parts["head"].volume_mm3() == pytest.approx(4 / 3 * math.pi * 16.0 ** 3, rel=0.02)
    assert np.linalg.norm(parts["head"].vertices - stem.head_centre_mm("4", "135 standard", 3.5), axis=1) \
        == pytest.approx(16.0)
    shell = meshes.cup_mesh(cup, "52")
    assert shell.is_closed
    assert shell.volume_mm3() == pytest.approx(2 / 3 * math.pi * (26.0 ** 3 - 23.0 ** 3), rel=0.03)
    # The body is as wide as the template says at its levels.
    body = parts["body"].vertices
    for h, ml in zip(stem.size("4").body_heights_mm[1:], stem.size("4").body_ml_width_mm[1:]):
        level = body[np.isclose(body[:, 2], h)]
        assert np.ptp(level[:, 0]) == pytest.approx(ml, abs=1e-9)


# --------------------------------------------------------------------------------------- outlines
def _placed(native, library, **changes):
    plan = dataclasses.replace(planning.auto_plan(native, library), **changes)
    return planning.place(native, plan, library)


def _distance_to_polyline(points, polygon):
    """Distance (px) of each point to the closed polygon's edges."""
    a, b = polygon, np.roll(polygon, -1, axis=0)
    ab = b - a
    t = np.clip(((points[:, None] - a[None]) * ab[None]).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    closest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(points[:, None] - closest, axis=-1).min(axis=1)


@pytest.mark.parametrize("lao_deg", [0.0, 90.0, 25.0])
def test_outlines_land_where_P_puts_the_implant(analytic, library, lao_deg):
    P = projection_matrix(CArmView(sdd_mm=1000, sid_mm=700, lao_deg=lao_deg, cranial_deg=0, rows=900,
                                   cols=700, pixel_mm=0.4, isocentre_mm=(-30, 0, -60)))
    placed = _placed(analytic, library)
    outlines = planning.implant_outlines(placed, P)
    world = planning.implant_meshes(placed)
    # Head: every ray through the outline of a sphere is tangent to it (inscribed 32-gon: < 0.1 mm).
    (head,) = outlines["head"]
    err = meshes.sphere_outline_error_mm(P, placed.head_centre_mm, placed.plan.head_diameter_mm / 2, head)
    assert np.abs(err).max() < 0.15
    # Stem and cup: every projected vertex is inside or within one 0.5 px raster step of the outline
    # (the trace runs half a step outside straight edges and cuts sharp corners by up to
    # step / sqrt(2)), and every outline point is within that of the projected surface (of a
    # projected vertex or a hull edge between two).
    from skimage.measure import points_in_poly

    for name in ("stem", "cup"):
        uv = project_points(P, world[name].vertices)
        polygon = max(outlines[name], key=len)
        inside = points_in_poly(uv, polygon)
        assert (inside | (_distance_to_polyline(uv, polygon) < meshes.OUTLINE_STEP_PX)).all(), name
        hull = meshes.convex_outline(uv)
        on_surface = points_in_poly(polygon, hull) | (_distance_to_polyline(polygon, hull) < meshes.OUTLINE_STEP_PX)
        assert on_surface.all(), name
    centre = project_points(P, placed.stem_to_world[:3, 3] + 20 * placed.stem_to_world[:3, 2])
    assert points_in_poly(centre[None], max(outlines["stem"], key=len))[0]


# --------------------------------------------------------------------------- canal and auto plan
def test_canal_of_the_analytic_femur(analytic):
    canal = analytic.canal
    assert len(canal.heights_mm) > 50
    expected = canal_width_mm(canal.heights_mm)
    assert np.ptp(expected) > 5  # a funnel, not a tube
    assert np.allclose(canal.ml_width_mm, expected, atol=0.15)
    assert np.allclose(canal.ap_width_mm, expected, atol=0.15)
    assert max(canal.heights_mm) == -planning.CANAL_START_BELOW_LT_MM


def test_auto_plan_fills_the_canal_and_restores_the_head(analytic, library):
    plan = planning.auto_plan(analytic, library)
    placed = planning.place(analytic, plan, library)
    changes = planning.plan_changes(analytic, placed)
    assert changes["canal_fit"]["fits"]
    sizes = [s.size for s in library.stem().sizes]
    bigger = sizes[sizes.index(plan.stem_size) + 1]
    variant, h = planning.best_neck(library.stem(), bigger, analytic.femoral_offset_mm)
    tip = planning._seat_for_leg_length(analytic, library.stem(), bigger, variant, h)
    larger = planning.place(analytic, dataclasses.replace(plan, stem_size=bigger, stem_variant=variant,
                                                          head_offset_mm=h, stem_tip_height_mm=tip), library)
    assert planning.stem_canal_fit(analytic, larger)["fits"] is False
    assert abs(changes["leg_length_change_mm"]) < 1e-9
    # the best neck of that size: no other variant/head offset restores the offset better
    stem = library.stem()
    best = min(abs(stem.size(plan.stem_size).offset_mm[v.name] + hh * math.sin(math.radians(v.neck_shaft_angle_deg))
                   - 42.0) for v in stem.variants for hh in stem.head_offsets_mm)
    assert abs(changes["offset_change_mm"]) == pytest.approx(best, abs=1e-9)
    # cup: the native 44 mm head + 4 mm margin -> 48 mm on the native centre, 40/20 deg
    assert plan.cup_size == "48" and np.allclose(plan.cup_centre_mm, 0.0)
    axis = placed.cup_to_world[:3, 2]
    assert math.degrees(math.asin(-axis[1])) == pytest.approx(20.0)
    assert math.degrees(math.atan2(-axis[0], -axis[2])) == pytest.approx(40.0)


@pytest.mark.parametrize("variant", ["135 standard", "135 high", "125 standard", "125 high"])
@pytest.mark.parametrize("head_offset_mm", [-3.5, 0.0, 3.5, 7.0])
def test_offset_and_leg_length_changes_equal_the_analytic_ones(analytic, library, variant, head_offset_mm):
    stem = library.stem()
    a = math.radians(stem.variant(variant).neck_shaft_angle_deg)
    size = stem.size("3")
    tip_mm = -130.0
    placed = _placed(analytic, library, stem_size="3", stem_variant=variant, head_offset_mm=head_offset_mm,
                     stem_tip_height_mm=tip_mm)
    changes = planning.plan_changes(analytic, placed)
    # Analytic: the head centre sits offset + h sin(a) from the stem (= shaft) axis, and
    # neck_axis_height + (offset / sin(a) + h) * (-cos a) above the tip; native: 42 mm offset,
    # head 40 mm above the lesser trochanter.
    offset = size.offset_mm[variant] + head_offset_mm * math.sin(a)
    height = tip_mm + size.neck_axis_height_mm - (size.offset_mm[variant] / math.sin(a) + head_offset_mm) * math.cos(a)
    assert changes["offset_change_mm"] == pytest.approx(offset - 42.0, abs=0.5)
    assert changes["leg_length_change_mm"] == pytest.approx(height + LESSER_TROCHANTER_Z_MM, abs=0.5)
    assert changes["head_centre_shift"]["medial_mm"] == pytest.approx(offset - 42.0, abs=0.5)
    assert changes["head_centre_shift"]["superior_mm"] == pytest.approx(height + LESSER_TROCHANTER_Z_MM, abs=0.5)
    assert changes["head_centre_shift"]["anterior_mm"] == pytest.approx(0.0, abs=1e-9)
    big = [w for w in changes["warnings"] if "offset" in w]
    assert bool(big) == (abs(offset - 42.0) > 5.0)


def test_version_and_cup_shift_in_patient_terms(analytic, library):
    placed = _placed(analytic, library, stem_version_change_deg=10.0, cup_centre_mm=(3.0, 2.0, 4.0))
    changes = planning.plan_changes(analytic, placed)
    offset = planning.plan_changes(analytic, _placed(analytic, library))["planned_offset_mm"]
    # + version turns the head forward: anterior by offset * sin(10 deg), medial loses 1 - cos
    assert changes["head_centre_shift"]["anterior_mm"] == pytest.approx(offset * math.sin(math.radians(10)), abs=1e-6)
    # a right hip: +x is medial, -y anterior, +z superior
    assert changes["cup_cor_shift"] == pytest.approx({"medial_mm": 3.0, "superior_mm": 4.0, "anterior_mm": -2.0})
    assert changes["hip_leg_length_change_mm"] == pytest.approx(changes["leg_length_change_mm"] - 4.0)
    assert changes["hip_offset_change_mm"] == pytest.approx(changes["offset_change_mm"] - 3.0)


@pytest.mark.parametrize("pose", [rigid_pose((8, -5, 20), (30, -12, 80)), MIRROR_X @ rigid_pose((0, 0, 0), (5, -3, 20))],
                         ids=["rotated", "left"])
def test_changes_do_not_depend_on_pose_or_side(analytic, library, pose):
    side = "left" if np.linalg.det(pose[:3, :3]) < 0 else "right"
    hu, labels, geometry = analytic_volumes(pose)
    native = planning.native_hip_from_measurements(analytic_measurements(pose, side))
    native = dataclasses.replace(native, canal=planning.canal_profile(hu, labels, geometry, native))
    n = min(len(native.canal.heights_mm), len(analytic.canal.heights_mm))  # the posed grid ends elsewhere
    assert n > 50 and np.allclose(native.canal.ml_width_mm[:n], analytic.canal.ml_width_mm[:n], atol=0.3)
    reference = planning.auto_plan(analytic, library)
    plan = planning.auto_plan(native, library)
    assert (plan.stem_size, plan.stem_variant, plan.head_offset_mm, plan.cup_size) == \
        (reference.stem_size, reference.stem_variant, reference.head_offset_mm, reference.cup_size)
    edits = dict(stem_version_change_deg=12.0, head_offset_mm=7.0, stem_tip_height_mm=plan.stem_tip_height_mm + 3)
    a = planning.plan_changes(analytic, planning.place(analytic, dataclasses.replace(reference, **edits), library))
    b = planning.plan_changes(native, planning.place(native, dataclasses.replace(plan, **edits), library))
    for key in ("offset_change_mm", "leg_length_change_mm"):
        assert b[key] == pytest.approx(a[key], abs=0.05)
    if side == "left":  # mirrored, not rotated: the patient-frame shifts are the same numbers
        assert b["head_centre_shift"] == pytest.approx(a["head_centre_shift"], abs=0.05)


@pytest.mark.parametrize("pose", [np.eye(4), rigid_pose((5, 3, -15), (-80, 40, 900))], ids=["atlas", "posed"])
def test_atlas_phantom_plan_changes_equal_the_analytic_ones(library, pose):
    hu, labels, geometry, m = atlas_case("compact", pose)
    native = planning.native_hip_from_measurements(m)
    native = dataclasses.replace(native, canal=planning.canal_profile(hu, labels, geometry, native))
    plan = planning.auto_plan(native, library)
    placed = planning.place(native, plan, library)
    changes = planning.plan_changes(native, placed)
    stem = library.stem()
    a = math.radians(stem.variant(plan.stem_variant).neck_shaft_angle_deg)
    size = stem.size(plan.stem_size)
    offset = size.offset_mm[plan.stem_variant] + plan.head_offset_mm * math.sin(a)
    height = plan.stem_tip_height_mm + size.neck_axis_height_mm - \
        (size.offset_mm[plan.stem_variant] / math.sin(a) + plan.head_offset_mm) * math.cos(a)
    assert changes["offset_change_mm"] == pytest.approx(offset - m["femoral_offset_mm"], abs=0.5)
    assert changes["leg_length_change_mm"] == pytest.approx(height - m["vertical_offset_mm"], abs=0.5)
    assert abs(changes["leg_length_change_mm"]) < 0.5 and abs(changes["offset_change_mm"]) < 5.0
    fit = changes["canal_fit"]
    assert fit["fits"] and fit["fill_ml_mean"] < fit["fill_ml_max"] <= 1.0 and not changes["warnings"]


# ------------------------------------------------------------------------------------- headless
def test_plan_command_writes_plan_and_meshes_atomically(tmp_path, capsys, library):
    hu, labels, geometry = analytic_volumes()
    case_out = write_case_out(tmp_path / "case_out", hu, labels, geometry, analytic_measurements())
    out = tmp_path / "plan"
    assert cli_run(["plan", str(case_out), "--out", str(out), "--anteversion", "15"]) == 0
    printed = json.loads(capsys.readouterr().out)
    doc = read_json_object(out / "plan.json", "plan")
    assert doc["format"] == planning.PLAN_FORMAT and doc["changes"] == printed["changes"]
    plan = planning.Plan.from_dict(doc["plan"])
    assert plan.cup_anteversion_deg == 15.0
    native = planning.native_hip_from_case_out(case_out)
    again = planning.plan_changes(native, planning.place(native, plan, library))
    assert again["offset_change_mm"] == pytest.approx(doc["changes"]["offset_change_mm"], abs=1e-9)
    for name, mesh in planning.implant_meshes(planning.place(native, plan, library)).items():
        back = read_stl(out / doc["files"][name])
        assert back.is_closed and np.allclose(back.bounds_mm()[0], mesh.bounds_mm()[0], atol=1e-3)
    # An existing plan is not overwritten without --overwrite, and nothing half-written is left.
    assert cli_run(["plan", str(case_out), "--out", str(out)]) == 2
    (case_out / "measurements.json").unlink()
    assert cli_run(["plan", str(case_out), "--out", str(tmp_path / "p2")]) == 2
    assert "measurements file not found" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["case_out", "plan"]


def _bones_available() -> bool:
    try:
        from inference.data.bones import bones_dir

        bones_dir()
        return True
    except Exception:  # noqa: BLE001 - any failure to find them means "not available"
        return False


@pytest.mark.skipif(not _bones_available(), reason="shared bone surfaces not found")
@pytest.mark.parametrize("seed", [3, 8])
def test_shape_augmented_phantom_plan_changes_equal_the_analytic_ones(library, seed):
    """A CT phantom of a real femur, shape-augmented and posed: its landmarks are known exactly."""
    from inference import measure
    from inference.data import phantom as ph
    from inference.data.atlas import grid_geometry

    model = ph.load_subject_model("MC22:right", spacing_mm=2.0, with_pelvis=False)
    p = ph.make_phantom(model, ph.sample_phantom_params(np.random.default_rng(seed)), grid_geometry("compact"))
    lm = p.landmarks_mm
    m = measure.measurements_from_landmarks(
        "right", lm["head_centre"], p.head_radius_mm, lm["shaft_point_distal"],
        np.subtract(lm["shaft_point_proximal"], lm["shaft_point_distal"]), lm["neck_point"], None,
        lm["lesser_trochanter"])
    native = planning.native_hip_from_measurements(m)
    native = dataclasses.replace(native, canal=planning.canal_profile(p.ct_hu, p.labels, p.geometry, native))
    # a funnel: wider under the lesser trochanter than 60 mm below it
    assert native.canal.ml_width_mm[0] > native.canal.ml_width_mm[min(24, len(native.canal.ml_width_mm) - 1)] + 5
    plan = planning.auto_plan(native, library)
    changes = planning.plan_changes(native, planning.place(native, plan, library))
    stem = library.stem()
    a = math.radians(stem.variant(plan.stem_variant).neck_shaft_angle_deg)
    size = stem.size(plan.stem_size)
    offset = size.offset_mm[plan.stem_variant] + plan.head_offset_mm * math.sin(a)
    height = plan.stem_tip_height_mm + size.neck_axis_height_mm - \
        (size.offset_mm[plan.stem_variant] / math.sin(a) + plan.head_offset_mm) * math.cos(a)
    assert changes["offset_change_mm"] == pytest.approx(offset - m["femoral_offset_mm"], abs=0.5)
    assert changes["leg_length_change_mm"] == pytest.approx(height - m["vertical_offset_mm"], abs=0.5)
    assert changes["canal_fit"]["fits"]
