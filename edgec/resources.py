"""Where edgec's data folders (targets/, templates/) live: beside the package in a source checkout,
or inside it (edgec/_data/) in an installed wheel."""
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"edgec's {name}/ folder is missing from {_PACKAGE}; reinstall edgec")
