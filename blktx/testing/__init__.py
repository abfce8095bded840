"""blktx.testing: what plugin authors and verification suites need.

- :class:`ActionTypeConformance`: the all-or-none contract as a test class to
  subclass for any action type (:mod:`blktx.testing.conformance`).
- :mod:`blktx.testing.strategies`: hypothesis strategies for transactions and
  failure plans (import it where hypothesis is installed).
- Fixtures for real components (``qcow2_image``, ``live_vm``, ``btrfs_mount``,
  ``blktx_registry``), loaded into pytest automatically through blktx's
  ``pytest11`` entry point (:mod:`blktx.testing.plugin`).
"""

from __future__ import annotations

from blktx.testing.conformance import ActionTypeConformance, ConformanceError

__all__ = ["ActionTypeConformance", "ConformanceError"]
