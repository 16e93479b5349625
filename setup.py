"""Package mapping only; all metadata is in pyproject.toml.

The SPEC §1 folders each hold one part of the `fleetward` package:
    src/fleetward/                     fleetward, .api, .cli, .devcluster
    operator/fleetward/operator/       fleetward.operator
    agent-runtime/fleetward/runtime/   fleetward.runtime
setuptools' `packages.find` cannot spread one package over several roots, so the
mapping is computed here. (`operator/` itself is no package: that name would shadow
the standard library module.)
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOTS = ("src", "operator", "agent-runtime")

packages: list[str] = []
package_dir: dict[str, str] = {}
for root in ROOTS:
    for name in find_namespace_packages(root, include=["fleetward", "fleetward.*"]):
        path = Path(root, *name.split("."))
        if (path / "__init__.py").exists():
            packages.append(name)
            package_dir[name] = path.as_posix()

setup(packages=packages, package_dir=package_dir, package_data={"fleetward": ["py.typed"]})
