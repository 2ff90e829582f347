"""Installed size of each `fedboard[...]` extra, measured on the distributions installed here.

What a Raspberry Pi downloads and unpacks for `pip install fedboard[edge]` is the dependency
closure of the `edge` extra; the server's is the `server` extra's. This resolves both from
`pyproject.toml` (the source of truth for the extras) through the installed distributions'
own requirements (`importlib.metadata`, environment markers and requested extras honoured)
and adds up the bytes of every file each distribution installed (its RECORD). The same
closure tells which top-level import names belong to an extra, which the edge-install test
uses to build an environment holding nothing else.

    python bench/edge_install_size.py            # JSON to stdout, a table to stderr
"""
from __future__ import annotations

import json
import re
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "fedboard"
_STEM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class Closure:
    """The distributions an extra pulls in, by canonical name, and what the extra declares."""

    extra: str
    declared: tuple[str, ...]                  # the extra's own requirement strings
    distributions: dict[str, metadata.Distribution]
    missing: tuple[str, ...]                   # required but not installed here

    def names(self) -> set[str]:
        return set(self.distributions)


def project_extras(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, list[str]]:
    with open(pyproject, "rb") as fh:
        return dict(tomllib.load(fh)["project"].get("optional-dependencies", {}))


def _extra_requirements(extra: str, extras: dict[str, list[str]], seen: set[str] | None = None) -> list[Requirement]:
    """The extra's requirements with `fedboard[other]` self-references expanded."""
    seen = set() if seen is None else seen
    if extra in seen:
        return []
    seen.add(extra)
    if extra not in extras:
        raise KeyError(f"pyproject.toml has no extra {extra!r}; it has {sorted(extras)}")
    out: list[Requirement] = []
    for text in extras[extra]:
        req = Requirement(text)
        if canonicalize_name(req.name) == PROJECT:
            for inner in sorted(req.extras):
                out.extend(_extra_requirements(inner, extras, seen))
        else:
            out.append(req)
    return out


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in (extras or {""}))


def dependency_closure(extra: str, pyproject: Path = ROOT / "pyproject.toml") -> Closure:
    """Every installed distribution `fedboard[extra]` needs, following requirements recursively."""
    extras = project_extras(pyproject)
    roots = _extra_requirements(extra, extras)
    found: dict[str, metadata.Distribution] = {}
    missing: list[str] = []
    requested: dict[str, set[str]] = {}
    queue: list[Requirement] = [r for r in roots if _applies(r, set())]
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        wanted = set(req.extras)
        if name in found and wanted <= requested.get(name, set()):
            continue
        requested.setdefault(name, set()).update(wanted)
        try:
            dist = found.get(name) or metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            if name not in missing:
                missing.append(name)
            continue
        found[name] = dist
        for text in dist.requires or []:
            child = Requirement(text)
            if _applies(child, requested[name]):
                queue.append(child)
    return Closure(extra, tuple(extras[extra]), found, tuple(sorted(missing)))


def _dist_files(dist: metadata.Distribution) -> list[Path]:
    files = []
    for item in dist.files or []:
        path = Path(dist.locate_file(item))
        if path.is_file():
            files.append(path)
    return files


def distribution_bytes(dist: metadata.Distribution) -> int:
    """Bytes of every installed file of `dist` (its RECORD), byte-compiled caches included."""
    return sum(p.stat().st_size for p in _dist_files(dist))


def top_level_entries(dist: metadata.Distribution) -> set[str]:
    """Names directly under site-packages that `dist` installed (packages, modules, .libs, dist-info)."""
    entries = set()
    for item in dist.files or []:
        parts = Path(str(item)).parts
        if parts and parts[0] != ".." and parts[0] != "__pycache__":
            entries.add(parts[0])
    return entries


def import_names(dist: metadata.Distribution) -> set[str]:
    """Top-level module names `dist` provides (what `import X` finds)."""
    text = dist.read_text("top_level.txt")
    names = {line.strip() for line in text.splitlines() if line.strip()} if text else set()
    for entry in top_level_entries(dist):
        if entry.endswith((".dist-info", ".egg-info", ".data", ".pth")):
            continue
        match = _STEM.match(entry)
        if match:
            names.add(match.group(1))
    return names


def closure_import_names(closure: Closure) -> set[str]:
    names: set[str] = set()
    for dist in closure.distributions.values():
        names |= import_names(dist)
    return names


def size_report(extras: tuple[str, ...] = ("edge", "server")) -> dict:
    report: dict = {"extras": {}}
    for extra in extras:
        closure = dependency_closure(extra)
        sizes = {name: distribution_bytes(dist) for name, dist in closure.distributions.items()}
        report["extras"][extra] = {
            "declared": list(closure.declared),
            "distributions": len(sizes),
            "installed_mb": round(sum(sizes.values()) / 1e6, 1),
            "by_distribution_mb": {k: round(v / 1e6, 2) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])},
            "missing": list(closure.missing),
        }
    if "edge" in report["extras"] and "server" in report["extras"]:
        edge, server = report["extras"]["edge"]["installed_mb"], report["extras"]["server"]["installed_mb"]
        report["server_over_edge"] = round(server / edge, 1) if edge else None
    report["python"] = sys.version.split()[0]
    return report


def main() -> None:
    report = size_report()
    print(json.dumps(report, indent=1))
    for extra, row in report["extras"].items():
        top = ", ".join(f"{k} {v}" for k, v in list(row["by_distribution_mb"].items())[:5])
        print(f"{extra:>7}: {row['installed_mb']:8.1f} MB in {row['distributions']:3d} distributions ({top})",
              file=sys.stderr)
    print(f"server / edge: {report.get('server_over_edge')}x", file=sys.stderr)


if __name__ == "__main__":
    main()
