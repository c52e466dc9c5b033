"""Complete the image's CycloneDX SBOM and validate it; runs in the Containerfile's `sbom` stage.

cyclonedx-py (cyclonedx-bom from PyPI) lists the Python environment /opt/venv;
this adds every Debian package dpkg knows in the image, names the image itself
as the SBOM's subject, validates the result against the CycloneDX 1.6 schema
and prints the versions a security review asks about first.

usage: python sbom.py PYTHON_BOM OUTPUT IMAGE_REFERENCE
       python sbom.py --summary SBOM      (what `make sbom` prints; standard library only)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPORTED = ("ray", "onnxruntime", "llama_cpp_python", "llama-cpp-python", "medserve")


def debian_components() -> list[dict[str, object]]:
    from packageurl import PackageURL

    listing = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\t${Version}\t${Architecture}\t${db:Status-Abbrev}\n"],
        capture_output=True, text=True, check=True,
    ).stdout
    release = Path("/etc/debian_version").read_text().strip()
    components = []
    for line in sorted(listing.splitlines()):
        name, version, arch, status = line.split("\t")
        if not status.startswith("ii"):
            continue  # removed, config files only
        purl = PackageURL(type="deb", namespace="debian", name=name, version=version,
                          qualifiers={"arch": arch, "distro": f"debian-{release.split('.')[0]}"}).to_string()
        components.append({"type": "library", "bom-ref": purl, "name": name, "version": version, "purl": purl,
                           "properties": [{"name": "medserve:package-manager", "value": "dpkg"}]})
    components.append({"type": "operating-system", "bom-ref": "debian-os", "name": "debian", "version": release})
    return components


def summary(bom: dict) -> str:
    components = bom.get("components", [])
    debian = [c for c in components if str(c.get("purl", "")).startswith("pkg:deb/")]
    # Python packages: cyclonedx-py's components (no purl for llama-cpp-python: built here, not PyPI's file).
    python = [c for c in components if c not in debian and c["type"] != "operating-system"]
    subject = bom["metadata"]["component"]
    lines = [f"CycloneDX {bom['specVersion']} SBOM of {subject['name']}:{subject['version']}: "
             f"{len(python)} Python packages, {len(debian)} Debian packages"]
    lines += [f"  {c['name']} {c['version']}" for c in python if str(c["name"]).lower() in REPORTED]
    return "\n".join(lines)


def main(python_bom: str, output: str, image: str) -> int:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    bom = json.loads(Path(python_bom).read_text())
    repository, _, tag = image.rpartition(":")
    bom["metadata"]["component"] = {"type": "container", "bom-ref": "medserve-image", "name": repository,
                                    "version": tag, "description": "medserve container image"}
    python = bom.get("components", [])
    debian = debian_components()
    bom["components"] = python + debian
    text = json.dumps(bom, indent=2, sort_keys=True)
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        print(f"SBOM does not validate against CycloneDX 1.6: {error}", file=sys.stderr)
        return 1
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(text + "\n")
    print("valid against the CycloneDX 1.6 schema; " + summary(bom))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summary"]:
        print(summary(json.loads(Path(sys.argv[2]).read_text())))
        sys.exit(0)
    sys.exit(main(*sys.argv[1:]))
