"""Print the runtime requirements from pyproject.toml, one per line.

The image installs its third-party dependencies in a layer of their own, before the package's
code is copied in, so that a code change does not re-run the dependency install. That layer can
only see pyproject.toml, hence this reader instead of `pip install .`.

    python docker/pyproject_requirements.py pyproject.toml > requirements.txt

Exit status 2, with the file and the cause on stderr, for a missing or unusable pyproject.toml.
"""

import sys
from typing import NoReturn

import tomllib


def fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(2)  # bad input, as everywhere in dist-free


def runtime_requirements(pyproject_path: str) -> list[str]:
    try:
        with open(pyproject_path, "rb") as f:
            meta = tomllib.load(f)
    except FileNotFoundError:
        fail(f"{pyproject_path}: file not found")
    except tomllib.TOMLDecodeError as err:
        fail(f"{pyproject_path}: not valid TOML ({err})")
    deps = meta.get("project", {}).get("dependencies")
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        fail(f"{pyproject_path}: [project] dependencies must be a list of strings")
    return deps


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        fail("usage: pyproject_requirements.py PYPROJECT_TOML")
    print("\n".join(runtime_requirements(argv[1])))


if __name__ == "__main__":
    main(sys.argv)
