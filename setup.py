"""Packaging glue: the user's folder layout maps onto one import package, ``ctrd``.

    ctrd/        -> ctrd          (shared code; ctrd/api holds generated protobuf code)
    daemon/      -> ctrd.daemon
    client/      -> ctrd.client
    shim/        -> ctrd.shim

pyproject.toml holds the metadata; only the folder mapping needs code, because
setuptools' automatic discovery cannot express it.
"""
from pathlib import Path

from setuptools import setup

ROOTS = {"ctrd": "ctrd", "ctrd.daemon": "daemon", "ctrd.client": "client", "ctrd.shim": "shim"}


def packages() -> list[str]:
    found = []
    for name, folder in ROOTS.items():
        base = Path(folder)
        for init in sorted(base.rglob("__init__.py")):
            rel = init.parent.relative_to(base)
            found.append(".".join([name, *rel.parts]) if rel.parts else name)
    return found


if __name__ == "__main__":  # setuptools runs this file as __main__
    setup(package_dir=ROOTS, packages=packages())
