"""``hipatlas gui ... --screenshot PATH --quit-after-register`` (run_gui), in-process and end to end."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from gui_helpers import synthetic_register, write_synthetic_case

pytestmark = pytest.mark.gui


@pytest.fixture
def isolated_settings(qapp, tmp_path):
    """Point the default QSettings store and app-data folders into the test's folder."""
    from PySide6.QtCore import QSettings, QStandardPaths

    QStandardPaths.setTestModeEnabled(True)
    for fmt in (QSettings.Format.NativeFormat, QSettings.Format.IniFormat):
        QSettings.setPath(fmt, QSettings.Scope.UserScope, str(tmp_path / "config"))
    yield
    QStandardPaths.setTestModeEnabled(False)


def _args(**overrides) -> argparse.Namespace:
    values = {"case_dir": None, "demo": False, "screenshot": None, "quit_after_register": True}
    values.update(overrides)
    return argparse.Namespace(**values)


def test_quit_after_register_saves_a_screenshot_and_exits_0(isolated_settings, tmp_path, monkeypatch):
    from app import main
    from inference import pipeline

    monkeypatch.setattr(pipeline, "register_case", synthetic_register)
    case = write_synthetic_case(tmp_path / "case")
    shot = tmp_path / "shots" / "window.png"
    assert main.run_gui(_args(case_dir=case, screenshot=str(shot))) == 0
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[0] > 500 and image.shape[1] > 900
    # the 3D view was composed into the grab (a native GL window grabs black): bone-coloured pixels
    r, g, b = (image[..., i].astype(int) for i in range(3))
    bone = (r > 150) & (g > 130) & (r > b + 15)
    assert bone.mean() > 0.01
    # the research-use banner (red) is in the picture
    banner = (r > 150) & (g < 70) & (b < 70)
    assert banner[:80].mean() > 0.1


def test_demo_flag_opens_the_bundled_demo_case(isolated_settings, tmp_path, monkeypatch):
    from app import main
    from inference import pipeline

    demo = tmp_path / "demo"
    write_synthetic_case(demo)
    monkeypatch.setattr(main, "DEMO_CASE", demo)
    monkeypatch.setattr(pipeline, "register_case", synthetic_register)
    assert main.run_gui(_args(demo=True)) == 0


def test_quit_after_register_fails_with_status_1(isolated_settings, tmp_path, monkeypatch, capsys):
    from app import main

    assert main.run_gui(_args(case_dir=str(tmp_path / "no-such-case"))) == 1
    assert "no such case folder or project file" in capsys.readouterr().err
    monkeypatch.setattr(main, "DEMO_CASE", tmp_path / "not-installed")
    assert main.run_gui(_args(demo=True)) == 1
    assert "demo case is not installed" in capsys.readouterr().err
