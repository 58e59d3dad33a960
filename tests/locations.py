"""Where the project and the shared external data are. A module of its own, not conftest.py: every
non-package conftest is imported under the one name `conftest`, so `from conftest import` reaches
whichever was loaded last (tests/train's when a run starts there)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
