"""deploy/k8s/batch: the Job runs `lmservice batch` on a file of the shared PVC, with the adapters the servers
serve, and comes back to resume when its pod is lost. (tests/deploy/test_deploy_k8s.py builds and validates
every kustomization, these included.)"""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from lmservice.cli import build_parser
from tests.deploy.deploy_support import K8S, find, kustomize_build

BATCH = {"cpu": K8S / "overlays/cpu/batch", "gpu": K8S / "overlays/gpu/batch"}


def _under(path: str, mounts: list[dict]) -> dict:
    return next(m for m in mounts if PurePosixPath(path).is_relative_to(m["mountPath"]))


@pytest.mark.parametrize("overlay", BATCH)
def test_batch_job_answers_a_file_on_the_shared_pvc(overlay: str) -> None:
    resources = kustomize_build(BATCH[overlay])
    job = find(resources, "Job")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = build_parser().parse_args(container["args"])  # the CLI's own parser takes the Job's arguments
    assert args.command == "batch"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = container["volumeMounts"]
    for path, writable in ((str(args.input_file), False), (str(args.output_file), True)):
        mount = _under(path, mounts)
        assert "persistentVolumeClaim" in volumes[mount["name"]], f"{path} must outlive the pod"
        assert not writable or not mount.get("readOnly")
    adapters_dir = {e["name"]: e["value"] for e in container["env"]}["LMSERVICE_ADAPTERS_DIR"]
    assert _under(adapters_dir, mounts)["subPath"] == "adapters"
    assert _under(adapters_dir, mounts)["readOnly"] is True
    # a lost or evicted pod comes back (and resumes); SIGTERM leaves time for the lines in flight
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 1
    assert pod["terminationGracePeriodSeconds"] >= 30
    policy = find(resources, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in policy["spec"] and "egress" not in policy["spec"]  # no network at all
