"""Developer sessions: tests, lint, typecheck, fuzz, bench, soak, image."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (PostgreSQL tests fail, not skip, when CI=true)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy>=1.10")
    session.run("mypy")


@nox.session
def fuzz(session: nox.Session) -> None:
    """Run the protocol fuzz target for many more examples than CI does."""
    session.install("-e", ".[test]")
    session.run(
        "pytest", "tests/protocol/test_fuzz.py", env={"RELATE_SMTP_FUZZ_EXAMPLES": "200000"}
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: print figures (throughput, CPU per message, memory)."""
    session.install("-e", ".[test]", "aiosmtpd>=1.4")
    session.run("python", "-m", "bench", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """Bounded soak (a few minutes): 500 connections of good, hostile and idle clients in
    two rounds; checks descriptors, tasks, RSS and message accounting, prints figures."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "soak.run", *session.posargs)


# The image docs/deploy.md's compose service names; the base the session makes for it.
IMAGE = "relate-smtp:latest"
IMAGE_BASE = "localhost/relate-smtp-base:bookworm"
IMAGE_TOOLS = {"podman": "podman", "buildah": "buildah", "mmdebstrap": "mmdebstrap"}


@nox.session(venv_backend="venv")
def image(session: nox.Session) -> None:
    """Build the container image from a local Debian base and run it as the original's
    compose service (image/check_image.py). Needs root; installs podman, buildah and
    mmdebstrap with apt-get when missing. Skips without them, fails when CI=true."""
    _image_tools(session)
    session.install("pyyaml>=6")
    work = Path(session.create_tmp()).resolve() / "containers"
    storage = ["--root", str(work / "storage"), "--runroot", str(work / "run")]
    storage += ["--storage-driver", "overlay"]
    bundle = _ca_bundle()
    # As root, podman keeps a blob-info cache in /var/lib/containers/cache whatever
    # --root says: removed afterwards when this session created it.
    system_cache = Path("/var/lib/containers")
    system_cache_existed = system_cache.exists()
    _remove_work(work)
    work.mkdir(parents=True)
    try:
        started = time.monotonic()
        # No public base image can be pulled here: the same Debian the slim Python images
        # are made of, with Debian's Python.
        base = work / "base.tar"
        session.run(
            "mmdebstrap",
            "--variant=apt",
            "--include=python3,python3-venv",
            "bookworm",
            str(base),
            "http://deb.debian.org/debian",
            external=True,
        )
        session.run(
            "podman",
            *storage,
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            str(base),
            IMAGE_BASE,
            external=True,
        )
        base.unlink()
        based = time.monotonic()
        # The proxy's CA bundle is lent to the build's RUN steps, never stored in a layer.
        session.run(
            "podman",
            *storage,
            "build",
            "--isolation=chroot",
            "--network",
            "host",
            "--pull=never",
            "--format",
            "docker",
            "--build-arg",
            f"BASE={IMAGE_BASE}",
            "-v",
            f"{bundle}:/etc/ssl/certs/ca-certificates.crt:ro",
            "--env",
            "PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
            "--unsetenv",
            "PIP_CERT",
            "-t",
            IMAGE,
            ".",
            external=True,
        )
        built = time.monotonic()
        size = subprocess.run(
            ["podman", *storage, "image", "inspect", "--format", "{{.Size}}", IMAGE],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        session.log(
            f"image {IMAGE}: {int(size) / 1e6:.0f} MB on the local Debian base; "
            f"base {based - started:.0f} s, build {built - based:.0f} s"
        )
        session.run(
            "python",
            "image/check_image.py",
            "--root",
            str(work / "storage"),
            "--runroot",
            str(work / "run"),
            "--compose",
            "docs/deploy.md",
            "--host-bundle",
            str(bundle),
        )
        session.log(f"image session: {time.monotonic() - started:.0f} s")
    finally:
        _remove_work(work)
        if not system_cache_existed:
            shutil.rmtree(system_cache, ignore_errors=True)


def _image_tools(session: nox.Session) -> None:
    """podman, buildah, mmdebstrap (and root for chroot builds), or skip/fail."""
    ci = os.environ.get("CI", "").lower() == "true"

    def unavailable(reason: str) -> None:
        if ci:
            session.error(f"image: {reason} (CI=true: this is a failure)")
        session.skip(f"image: {reason}")

    if os.geteuid() != 0:
        unavailable("needs root (chroot builds, file capabilities, PID namespaces)")
    missing = [package for tool, package in IMAGE_TOOLS.items() if not shutil.which(tool)]
    if not missing:
        return
    if not shutil.which("apt-get"):
        unavailable(f"{', '.join(missing)} missing and no apt-get to install them")
    session.log(f"installing {', '.join(missing)} with apt-get")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    update = subprocess.run(["apt-get", "update", "-q"], env={**os.environ, **env}, check=False)
    install = subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        env={**os.environ, **env},
        check=False,
    )
    still = [tool for tool in IMAGE_TOOLS if not shutil.which(tool)]
    if update.returncode or install.returncode or still:
        unavailable(f"apt-get could not install {', '.join(still or missing)}")


def _ca_bundle() -> Path:
    """The CA bundle pip is configured with (``global.cert``), else the system's."""
    configured = subprocess.run(
        ["python3", "-m", "pip", "config", "get", "global.cert"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    for candidate in (
        configured,
        os.environ.get("PIP_CERT", ""),
        os.environ.get("SSL_CERT_FILE", ""),
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    return Path("/etc/ssl/certs/ca-certificates.crt")


def _remove_work(work: Path) -> None:
    """Unmount what podman/buildah left mounted under ``work``, then delete it."""
    if not work.exists():
        return
    prefix = f"{work}/"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(work, ignore_errors=True)
