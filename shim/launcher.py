"""Write a fast launcher for the shim: ``python -m ctrd.shim.launcher [PATH]``.

The console script pip generates starts a full interpreter: ``site`` processes the
.pth files, and an editable install's finder pulls in pathlib and importlib.util,
about 25 ms of CPU before the shim's first line, on every ``start`` and every
``delete`` containerd runs. The launcher written here runs the interpreter isolated
and without ``site`` (``-IS``), with the folders the shim imports from written in
as absolute paths, found once at install time. It replaces the console script
(default: ``containerd-shim-ctrd-v2`` beside this interpreter); run it again after
``pip install`` has rewritten that script.
"""
from __future__ import annotations

import os
import sys

NAME = "containerd-shim-ctrd-v2"

# An editable install keeps ctrd.shim outside ctrd's folder; this finder, small enough
# to cost nothing, maps just that package to where it lives.
FINDER = '''
from importlib.machinery import PathFinder


class _ShimFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "ctrd.shim":
            return PathFinder.find_spec(name, [{parent!r}])
        return None


sys.meta_path.insert(0, _ShimFinder)
'''


def script() -> str:
    import google.protobuf

    import ctrd
    import ctrd.shim

    ctrd_dir = os.path.dirname(os.path.abspath(ctrd.__file__))
    shim_dir = os.path.dirname(os.path.abspath(ctrd.shim.__file__))
    # google is a namespace package: its folder's parent is the site-packages folder.
    deps = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        google.protobuf.__file__))))
    paths = list(dict.fromkeys([os.path.dirname(ctrd_dir), deps]))
    finder = ""
    if shim_dir != os.path.join(ctrd_dir, "shim"):
        finder = FINDER.format(parent=os.path.dirname(shim_dir))
    return (f"#!{sys.executable} -IS\n"
            f'"""{NAME}, written by ctrd.shim.launcher (no site, fixed paths)."""\n'
            "import sys\n\n"
            f"sys.path += {paths!r}\n"
            f"{finder}\n"
            "from ctrd.shim.main import main\n\n"
            "sys.exit(main())\n")


def install(path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(script())
    os.chmod(tmp, 0o755)
    os.rename(tmp, path)


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(sys.executable), NAME)
    install(path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
