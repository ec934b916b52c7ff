"""Validates deploy/ for `cargo xtask test` (xtask/src/manifests.rs runs it in target/deploy-venv).

1. Every manifest against the Kubernetes OpenAPI schemas of the oldest and newest supported versions, strictly
   (unknown fields are errors). Custom resources have no such schema, so deploy/ may hold only built-in kinds.
2. The CRDs: aad-pod-identity's group, version, kinds and plural names, and structural schemas.
3. deploy/examples/: aad-pod-identity manifests validated against those CRDs, unknown fields being errors as with
   `kubectl apply` (strict field validation).
4. The kustomizations: every manifest listed, every listed file present, the image pinned by digest.
5. The startup-taint admission policy against the requests it must admit and refuse (check_admission_policy.py).
6. checkov on deploy/ and the Containerfile, offline; every finding must be accepted with a reason in
   deploy/checkov-accepted.yaml, and every acceptance must still match a finding.

Prints one line per problem and exits 1 if there was any.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jsonschema
import yaml
from kubernetes_validate import utils as kv

import check_admission_policy

# Oldest: securityContext.appArmorProfile is GA from 1.31 on. Newest: what kubernetes-validate knows, which matches the
# agent's k8s-openapi feature (v1_37).
K8S_VERSIONS = ["1.31", "1.37"]

GROUP = "aadpodidentity.k8s.io"
CRDS = {
    "AzureIdentity": "azureidentities",
    "AzureIdentityBinding": "azureidentitybindings",
    "AzurePodIdentityException": "azurepodidentityexceptions",
}
IMAGE_NAME = "ghcr.io/OWNER/nmi-agent"
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Files in deploy/ that are not Kubernetes objects.
NOT_MANIFESTS = {"kustomization.yaml", "checkov-accepted.yaml"}
EXAMPLES = "examples"

problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


def load_all(path):
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def yaml_files(deploy):
    for dirpath, dirnames, filenames in os.walk(deploy):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith((".yaml", ".yml")):
                yield os.path.relpath(os.path.join(dirpath, name), deploy)


def name_of(doc):
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


# --- 1. Kubernetes schemas ------------------------------------------------------------------------------------------


def validate_builtin(rel, doc):
    for version in K8S_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top level)"
            problem(rel, f"{name_of(doc)} is invalid for Kubernetes {version}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            problem(rel, f"{name_of(doc)}: {e.message}; deploy/ may hold only built-in kinds and CRDs")


# --- 2. CRDs --------------------------------------------------------------------------------------------------------

STRUCTURAL_FORBIDDEN = {"$ref", "definitions", "dependencies", "patternProperties", "additionalItems", "id"}


def check_structural(where, node, path, top=False):
    """The parts of Kubernetes' structural-schema rules a schema written by hand can get wrong."""
    if not isinstance(node, dict):
        problem(where, f"{path}: a schema must be a mapping")
        return
    for key in STRUCTURAL_FORBIDDEN & node.keys():
        problem(where, f"{path}: `{key}` is not allowed in a structural schema")
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    if "type" not in node and not (preserve or int_or_string):
        problem(where, f"{path}: no `type` (structural schemas need one on every node)")
    if "properties" in node and "additionalProperties" in node:
        problem(where, f"{path}: `properties` and `additionalProperties` are mutually exclusive")
    if ("properties" in node or "additionalProperties" in node) and node.get("type") != "object":
        problem(where, f"{path}: `properties` on a node whose type is not object")
    if node.get("type") == "array" and "items" not in node:
        problem(where, f"{path}: an array needs `items`")
    if top:
        for field in ("apiVersion", "kind", "metadata"):
            if field not in node.get("properties", {}):
                problem(where, f"{path}: the top level should declare `{field}`")
    for name, child in (node.get("properties") or {}).items():
        check_structural(where, child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        check_structural(where, node["additionalProperties"], f"{path}.*")
    if "items" in node:
        check_structural(where, node["items"], f"{path}[]")


def check_crd(rel, doc, crd_schemas):
    spec = doc.get("spec") or {}
    names = spec.get("names") or {}
    kind = names.get("kind")
    if kind not in CRDS:
        problem(rel, f"unexpected CRD kind {kind!r}; expected one of {sorted(CRDS)}")
        return
    plural = CRDS[kind]
    expected = {
        "group": (spec.get("group"), GROUP),
        "names.plural": (names.get("plural"), plural),
        "names.singular": (names.get("singular"), kind.lower()),
        "names.listKind": (names.get("listKind"), kind + "List"),
        "scope": (spec.get("scope"), "Namespaced"),
        "metadata.name": (doc["metadata"].get("name"), f"{plural}.{GROUP}"),
    }
    for field, (have, want) in expected.items():
        if have != want:
            problem(rel, f"{kind}: {field} is {have!r}, aad-pod-identity has {want!r}")
    versions = spec.get("versions") or []
    if [v.get("name") for v in versions] != ["v1"] or not all(v.get("served") and v.get("storage") for v in versions):
        problem(rel, f"{kind}: expected exactly one version, v1, served and stored")
        return
    schema = (versions[0].get("schema") or {}).get("openAPIV3Schema")
    if not schema:
        problem(rel, f"{kind}: no openAPIV3Schema")
        return
    check_structural(f"{rel} ({kind})", schema, "openAPIV3Schema", top=True)
    crd_schemas[kind] = schema


# --- 3. aad-pod-identity examples against the CRDs ------------------------------------------------------------------


def to_jsonschema(node):
    """OpenAPI v3 (as CRDs use it) to JSON Schema: `nullable` becomes a null alternative; x-kubernetes-* are dropped."""
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) if isinstance(v, dict) else v for k, v in node.items() if not k.startswith("x-")}
    if "properties" in node:
        out["properties"] = {k: to_jsonschema(v) for k, v in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_jsonschema(node["additionalProperties"])
    if "items" in node:
        out["items"] = to_jsonschema(node["items"])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    return out


def unknown_fields(schema, value, path):
    """Fields the API server would prune, and `kubectl apply` (strict field validation) reject."""
    if not isinstance(value, dict) or not isinstance(schema, dict):
        if isinstance(value, list) and isinstance(schema, dict) and "items" in schema:
            for i, item in enumerate(value):
                yield from unknown_fields(schema["items"], item, f"{path}[{i}]")
        return
    if schema.get("x-kubernetes-preserve-unknown-fields") or path == ".metadata":
        return
    props = schema.get("properties")
    extra = schema.get("additionalProperties")
    for key, child in value.items():
        if props is not None and key in props:
            yield from unknown_fields(props[key], child, f"{path}.{key}")
        elif isinstance(extra, dict):
            yield from unknown_fields(extra, child, f"{path}.{key}")
        else:
            yield f"{path}.{key}"


def check_examples(deploy, crd_schemas):
    folder = os.path.join(deploy, EXAMPLES)
    if not os.path.isdir(folder):
        return 0
    count = 0
    for name in sorted(os.listdir(folder)):
        rel = os.path.join(EXAMPLES, name)
        if not name.endswith((".yaml", ".yml")):
            continue
        for doc in load_all(os.path.join(deploy, rel)):
            count += 1
            kind = doc.get("kind")
            if doc.get("apiVersion") != f"{GROUP}/v1" or kind not in crd_schemas:
                problem(rel, f"{name_of(doc)}: examples must be {GROUP}/v1 objects of the CRDs in deploy/crds/")
                continue
            schema = crd_schemas[kind]
            validator = jsonschema.Draft4Validator(to_jsonschema(schema))
            for error in validator.iter_errors(doc):
                path = ".".join(str(p) for p in error.path) or "(top level)"
                problem(rel, f"{name_of(doc)}: {path}: {error.message}")
            for field in unknown_fields(schema, doc, ""):
                problem(rel, f"{name_of(doc)}: unknown field {field} (pruned by the API server, rejected by kubectl)")
    return count


# --- 4. kustomizations and the image reference ----------------------------------------------------------------------


def check_kustomizations(deploy, manifests, daemonset_images):
    listed = set()
    for rel in ("kustomization.yaml", "service-principal/kustomization.yaml"):
        path = os.path.join(deploy, rel)
        if not os.path.isfile(path):
            problem(rel, "missing")
            continue
        docs = load_all(path)
        kust = docs[0] if docs else {}
        base = os.path.dirname(rel)
        for res in kust.get("resources") or []:
            target = os.path.normpath(os.path.join(base, res))
            if not os.path.isfile(os.path.join(deploy, target)):
                problem(rel, f"resource {res} does not exist")
            listed.add(target)
        if rel == "kustomization.yaml":
            images = kust.get("images") or []
            if len(images) != 1 or images[0].get("name") != IMAGE_NAME:
                problem(rel, f"expected exactly one `images` entry, named {IMAGE_NAME}")
            else:
                digest = str(images[0].get("digest", ""))
                if not DIGEST.match(digest):
                    problem(rel, f"images[0].digest {digest!r} is not sha256:<64 hex digits>")
                if "newTag" in images[0]:
                    problem(rel, "images[0] must pin a digest, not a tag")
    for rel in manifests:
        if rel not in listed:
            problem(rel, "not listed in any kustomization.yaml, so `kubectl apply -k deploy` would leave it out")
    if not daemonset_images:
        problem("daemonset.yaml", "no DaemonSet container found")
    for image in daemonset_images:
        name, _, digest = image.partition("@")
        if name != IMAGE_NAME or not DIGEST.match(digest):
            problem("daemonset.yaml", f"image {image!r} must be {IMAGE_NAME}@sha256:<digest> (kustomize sets it)")


# --- 6. checkov -----------------------------------------------------------------------------------------------------


def run_checkov(deploy, checkov, scan_dir):
    """Returns {(check, file)} of failed checks, file relative to deploy/ (the Containerfile as `Containerfile`)."""
    # checkov recognises Dockerfiles by name only (`Dockerfile`, `*.dockerfile`), so it scans a copy of deploy/ in
    # which the Containerfile also goes by a name it knows.
    shutil.rmtree(scan_dir, ignore_errors=True)
    shutil.copytree(deploy, scan_dir)
    shutil.copyfile(os.path.join(deploy, "Containerfile"), os.path.join(scan_dir, "Containerfile.dockerfile"))
    env = dict(os.environ, CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false", BC_SKIP_MAPPING="TRUE")
    command = [
        checkov, "--directory", scan_dir, "--framework", "kubernetes", "dockerfile",
        "--output", "json", "--quiet", "--compact", "--skip-download", "--skip-results-upload",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    # checkov exits 1 when a check fails; anything else, or no JSON, is a broken run.
    if result.returncode not in (0, 1):
        problem("checkov", f"exited {result.returncode}: {result.stderr.strip()[-2000:]}")
        return None
    try:
        reports = json.loads(result.stdout)
    except json.JSONDecodeError:
        problem("checkov", f"printed no JSON report: {result.stdout[-500:]} {result.stderr.strip()[-2000:]}")
        return None
    if isinstance(reports, dict):
        reports = [reports] if "results" in reports else []
    failed = set()
    seen = set()
    for report in reports:
        seen.add(report.get("check_type"))
        summary = report.get("summary", {})
        if summary.get("parsing_errors"):
            problem("checkov", f"{report.get('check_type')}: {summary['parsing_errors']} file(s) could not be parsed")
        for finding in report["results"]["failed_checks"]:
            rel = finding["file_path"].lstrip("/")
            if rel == "Containerfile.dockerfile":
                rel = "Containerfile"
            failed.add((finding["check_id"], rel))
    for framework in ("kubernetes", "dockerfile"):
        if framework not in seen:
            problem("checkov", f"no {framework} report: checkov scanned none of those files")
    return failed


def check_checkov(deploy, checkov, scan_dir):
    accepted_path = os.path.join(deploy, "checkov-accepted.yaml")
    entries = (load_all(accepted_path) or [{}])[0].get("accepted") or []
    accepted = {}
    for entry in entries:
        key = (entry.get("check"), entry.get("file"))
        reason = (entry.get("reason") or "").strip()
        if len(reason) < 20:
            problem("checkov-accepted.yaml", f"{key[0]} in {key[1]}: every acceptance needs a real reason")
        if key in accepted:
            problem("checkov-accepted.yaml", f"{key[0]} in {key[1]} is listed twice")
        accepted[key] = reason
    failed = run_checkov(deploy, checkov, scan_dir)
    if failed is None:
        return 0
    for check, rel in sorted(failed - accepted.keys()):
        problem(rel, f"checkov {check} failed and is not accepted: fix it, or add it with a reason to "
                     f"deploy/checkov-accepted.yaml")
    for check, rel in sorted(accepted.keys() - failed):
        problem("checkov-accepted.yaml", f"{check} in {rel} no longer fails: remove the entry")
    return len(failed)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--deploy", required=True)
    parser.add_argument("--checkov", required=True, help="the venv's checkov executable")
    parser.add_argument("--scan-dir", required=True, help="scratch directory for checkov's copy of deploy/")
    args = parser.parse_args()
    deploy = os.path.abspath(args.deploy)

    started = time.monotonic()
    manifests, crd_schemas, images, objects, policy_cases = [], {}, [], 0, 0
    for rel in yaml_files(deploy):
        if rel in NOT_MANIFESTS or os.path.basename(rel) == "kustomization.yaml" or rel.startswith(EXAMPLES + os.sep):
            continue
        manifests.append(rel)
        try:
            docs = load_all(os.path.join(deploy, rel))
        except yaml.YAMLError as e:
            problem(rel, f"not valid YAML: {e}")
            continue
        for doc in docs:
            objects += 1
            if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
                problem(rel, "every document must be a Kubernetes object with apiVersion and kind")
                continue
            validate_builtin(rel, doc)
            if doc["kind"] == "CustomResourceDefinition":
                check_crd(rel, doc, crd_schemas)
            if doc["kind"] == "ValidatingAdmissionPolicy" and rel == "startup-taint-policy.yaml":
                policy_cases += check_admission_policy.check(doc, problem)
            if doc["kind"] == "DaemonSet":
                pod = doc.get("spec", {}).get("template", {}).get("spec", {})
                images += [c.get("image", "") for c in pod.get("containers", []) + pod.get("initContainers", [])]
    if policy_cases == 0:
        problem("startup-taint-policy.yaml", "no ValidatingAdmissionPolicy found to check")
    missing = sorted(set(CRDS) - crd_schemas.keys())
    if missing:
        problem("crds/", f"missing CRDs for {missing}")
    examples = check_examples(deploy, crd_schemas)
    check_kustomizations(deploy, manifests, images)
    schema_time = time.monotonic() - started

    started = time.monotonic()
    findings = check_checkov(deploy, args.checkov, args.scan_dir)
    checkov_time = time.monotonic() - started

    for line in problems:
        print(f"deploy/{line}" if not line.startswith("checkov:") else line)
    print(
        f"manifests: {objects} objects in {len(manifests)} files against Kubernetes {' and '.join(K8S_VERSIONS)}, "
        f"{len(crd_schemas)} CRDs, {examples} examples, {policy_cases} admission cases ({schema_time:.1f}s); checkov: {findings} findings, all "
        f"accepted with reasons ({checkov_time:.1f}s)" if not problems else f"manifests: {len(problems)} problem(s)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
