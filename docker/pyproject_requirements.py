"""Print the runtime requirements from pyproject.toml, one per line.

The image installs its third-party dependencies in a layer of their own, before the package's
code is copied in, so that a code change does not re-run the dependency install. That layer can
only see pyproject.toml, hence this reader instead of `pip install .`.

    python docker/pyproject_requirements.py pyproject.toml > requirements.txt
"""

import sys

import tomllib


def runtime_requirements(pyproject_path: str) -> list[str]:
    try:
        with open(pyproject_path, "rb") as f:
            meta = tomllib.load(f)
    except FileNotFoundError:
        raise SystemExit(f"{pyproject_path}: file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise SystemExit(f"{pyproject_path}: not valid TOML ({err})") from None
    deps = meta.get("project", {}).get("dependencies")
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise SystemExit(f"{pyproject_path}: [project] dependencies must be a list of strings")
    return deps


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: pyproject_requirements.py PYPROJECT_TOML")
    print("\n".join(runtime_requirements(argv[1])))


if __name__ == "__main__":
    main(sys.argv)
