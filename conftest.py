"""Project-wide test configuration.

``pytester`` drives real pytest sessions in the plugin tests (tests/test_plugin.py), the way
pytest-xdist and hypothesis test their own plugins.
"""

from __future__ import annotations

pytest_plugins = ("pytester",)
