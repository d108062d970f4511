"""infra/ as code that is checked: the CloudFormation template passes cfn-lint and deploys into moto's server, where
a real `superres worker`, configured from the template's own task definition, drains the stack's queue; the
Kubernetes manifests pass the Kubernetes JSON schemas bundled by `kubernetes-validate` (offline) and the KEDA
objects a schema of KEDA's CRDs written down here from KEDA's docs. Nothing is downloaded at test time."""

import copy
import fnmatch
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

import cv2
import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import yaml
from cfnlint.decode.cfn_yaml import load as load_cfn_yaml

from conftest import DATASETS, REPO, SHARED, SHARED_MODELS, cli_env, superres_cmd
from moto_server import aws_env, client, free_port
from pipeline.settings import Settings

TEMPLATE = REPO / "infra" / "aws" / "superres.yaml"
K8S = REPO / "infra" / "k8s"
MODEL = "fsrcnn-small-x2"
REGION = "us-east-1"


def template() -> dict:
    return load_cfn_yaml(str(TEMPLATE))


def settings_names(env: dict[str, str]) -> set[str]:
    """SUPERRES_* names that are not settings (a typo would be ignored silently by load_settings)."""
    return {k for k in env if k.startswith("SUPERRES_") and k[len("SUPERRES_"):].lower() not in Settings.field_names()}


def settings_from(env: dict[str, str]) -> Settings:
    """The values as the service would read them (validated; a bad one raises)."""
    return Settings.from_values({k[len("SUPERRES_"):].lower(): v for k, v in env.items() if k.startswith("SUPERRES_")})


# ------------------------------------------------------------------------------------------ CloudFormation --------

def test_template_passes_cfn_lint():
    # informational checks too (explicit deletion policies for stateful resources)
    # the cfn-lint command (its console script's entry point, run with this Python)
    lint = [sys.executable, "-c", "import sys; from cfnlint.runner import main; sys.exit(main())"]
    run = subprocess.run([*lint, "--include-checks", "I", "--", str(TEMPLATE)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_template_has_the_pieces_the_service_needs():
    t = template()
    params, res = t["Parameters"], t["Resources"]
    assert {"ImageUri", "Model", "InboxPrefix", "OutboxPrefix", "FailedPrefix", "GpuInstanceType", "MaxWorkers",
            "MaxReceiveCount", "DeployCompute"} <= set(params)
    by_type = {}
    for name, r in res.items():
        by_type.setdefault(r["Type"], []).append(name)
    # storage, queue and the worker policy are always there; everything that runs is behind a compute condition
    for name, r in res.items():
        service = r["Type"].split("::")[1]
        if service in ("S3", "SQS") or r["Type"] == "AWS::IAM::ManagedPolicy":
            assert "Condition" not in r, name
        else:
            assert r.get("Condition") in ("GpuPath", "LambdaPath"), name

    task = res["WorkerTaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    assert task["ResourceRequirements"] == [{"Type": "GPU", "Value": "1"}] and task["Command"] == ["worker"]
    target = res["WorkerScalableTarget"]["Properties"]
    assert target["MinCapacity"] == 0 and target["MaxCapacity"] == {"Ref": "MaxWorkers"}
    watched = {(a["Properties"].get("MetricName") or "metric math", a["Properties"]["AlarmActions"][0]["Ref"])
               for a in (res[n] for n in by_type["AWS::CloudWatch::Alarm"])}
    assert ("ApproximateNumberOfMessagesVisible", "ScaleOutPolicy") in watched
    assert {("metric math", "ScaleInPolicy")} <= watched
    assert res["ScaleInPolicy"]["Properties"]["StepScalingPolicyConfiguration"]["StepAdjustments"][0]["ScalingAdjustment"] == 0

    function = res["UpscaleFunction"]["Properties"]
    assert function["PackageType"] == "Image" and function["Code"] == {"ImageUri": {"Ref": "ImageUri"}}
    mapping = res["UpscaleEventSource"]["Properties"]
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["EventSourceArn"] == {"Fn::GetAtt": ["JobQueue", "Arn"]}
    redrive = res["JobQueue"]["Properties"]["RedrivePolicy"]
    assert redrive == {"deadLetterTargetArn": {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]},
                       "maxReceiveCount": {"Ref": "MaxReceiveCount"}}

    # every SUPERRES_* variable the template sets is a setting of the service
    task_env = {e["Name"]: e["Value"] for e in task["Environment"]}
    lambda_env = function["Environment"]["Variables"]
    assert settings_names(task_env) == set() and settings_names(lambda_env) == set()
    assert {"SUPERRES_OUTBOX", "SUPERRES_FAILED", "SUPERRES_MODEL", "SUPERRES_MODEL_DIR"} <= set(lambda_env)
    assert "AWS_REGION" not in lambda_env  # reserved by Lambda: setting it fails the deployment


# ------------------------------------------------------------------------------------------ deployed into moto -----

class Stack:
    """A deployed stack as its template sees it: Ref, Fn::GetAtt, Fn::Sub, Fn::If, Fn::Join over the stack's real
    parameters and physical resources, so that what moto does not apply can be applied from the template itself."""

    NO_VALUE = object()

    def __init__(self, endpoint: str, name: str, body: dict):
        cfn = client("cloudformation", endpoint)
        self.sqs = client("sqs", endpoint)
        self.body = body
        desc = cfn.describe_stacks(StackName=name)["Stacks"][0]
        assert desc["StackStatus"] == "CREATE_COMPLETE", desc.get("StackStatusReason")
        self.outputs = {o["OutputKey"]: o["OutputValue"] for o in desc.get("Outputs", [])}
        self.refs = {key: p.get("Default") for key, p in body["Parameters"].items()}
        self.refs.update({p["ParameterKey"]: p["ParameterValue"] for p in desc.get("Parameters", [])})
        self.refs.update({"AWS::Region": REGION, "AWS::AccountId": desc["StackId"].split(":")[4],
                          "AWS::Partition": "aws", "AWS::StackName": name, "AWS::URLSuffix": "amazonaws.com"})
        self.types = {}
        for r in cfn.describe_stack_resources(StackName=name)["StackResources"]:
            if r.get("LogicalResourceId"):  # moto lists the resources it skipped without one
                self.refs[r["LogicalResourceId"]] = r["PhysicalResourceId"]
                self.types[r["LogicalResourceId"]] = r["ResourceType"]

    def created(self, logical_id: str) -> bool:
        return logical_id in self.types

    def condition(self, name: str) -> bool:
        return self._truth(self.body["Conditions"][name])

    def _truth(self, node) -> bool:
        (fn, args), = node.items()
        if fn == "Condition":
            return self.condition(args)
        if fn == "Fn::Equals":
            return self.resolve(args[0]) == self.resolve(args[1])
        if fn == "Fn::Not":
            return not self._truth(args[0])
        if fn == "Fn::And":
            return all(self._truth(a) for a in args)
        if fn == "Fn::Or":
            return any(self._truth(a) for a in args)
        raise NotImplementedError(fn)

    def ref(self, name: str):
        if name == "AWS::NoValue":
            return self.NO_VALUE
        if name not in self.refs:
            raise KeyError(f"{name} is neither a parameter nor a resource moto created")
        return self.refs[name]

    def getatt(self, logical_id: str, attr: str) -> str:
        kind, physical = self.body["Resources"][logical_id]["Type"], self.ref(logical_id)
        if kind == "AWS::S3::Bucket" and attr == "Arn":
            return f"arn:aws:s3:::{physical}"
        if kind == "AWS::SQS::Queue" and attr == "Arn":
            return self.sqs.get_queue_attributes(QueueUrl=physical, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        if kind == "AWS::SQS::Queue" and attr == "QueueName":
            return physical.rsplit("/", 1)[1]
        raise NotImplementedError(f"{logical_id}.{attr}")

    def _sub(self, text: str, extra: dict) -> str:
        def one(match):
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in extra:
                return str(extra[name])
            if "." in name and not name.startswith("AWS::"):
                return str(self.getatt(*name.split(".", 1)))
            return str(self.ref(name))
        return re.sub(r"\$\{([^}]+)\}", one, text)

    def resolve(self, node):
        if isinstance(node, dict):
            if len(node) == 1:
                (fn, args), = node.items()
                if fn == "Ref":
                    return self.ref(args)
                if fn == "Fn::GetAtt":
                    return self.getatt(*(args if isinstance(args, list) else args.split(".", 1)))
                if fn == "Fn::Sub":
                    text, extra = (args, {}) if isinstance(args, str) else (args[0], self.resolve(args[1]))
                    return self._sub(text, extra)
                if fn == "Fn::If":
                    return self.resolve(args[1] if self.condition(args[0]) else args[2])
                if fn == "Fn::Join":
                    return args[0].join(str(x) for x in self.resolve(args[1]))
            out = {}
            for key, value in node.items():
                value = self.resolve(value)
                if value is not self.NO_VALUE:
                    out[key] = value
            return out
        if isinstance(node, list):
            return [v for v in (self.resolve(x) for x in node) if v is not self.NO_VALUE]
        return node

    def properties(self, logical_id: str) -> dict:
        return self.resolve(self.body["Resources"][logical_id]["Properties"])

    def apply_what_moto_skips(self, s3) -> dict[str, dict]:
        """moto creates the buckets and queues but not their queue policy, public access blocks or notifications
        (DESIGN.md: a template's NotificationConfiguration delivers nothing there): apply them through the API,
        read from the template, as CloudFormation would have. Bucket policies are resolved and returned, not
        applied: moto evaluates a bucket policy's Deny without its conditions (it has no aws:SecureTransport to
        compare), so the TLS-only Deny would refuse every request, over TLS or not."""
        bucket_policies = {}
        for logical_id, r in self.body["Resources"].items():
            if "Condition" in r and not self.condition(r["Condition"]):
                continue
            if r["Type"] == "AWS::S3::BucketPolicy":
                p = self.properties(logical_id)
                bucket_policies[p["Bucket"]] = p["PolicyDocument"]
            elif r["Type"] == "AWS::SQS::QueuePolicy":
                p = self.properties(logical_id)
                for queue in p["Queues"]:
                    self.sqs.set_queue_attributes(QueueUrl=queue, Attributes={"Policy": json.dumps(p["PolicyDocument"])})
            elif r["Type"] == "AWS::S3::Bucket":
                p, bucket = self.properties(logical_id), self.ref(logical_id)
                if "PublicAccessBlockConfiguration" in p:
                    s3.put_public_access_block(Bucket=bucket,
                                               PublicAccessBlockConfiguration=p["PublicAccessBlockConfiguration"])
                if "NotificationConfiguration" in p:
                    s3.put_bucket_notification_configuration(
                        Bucket=bucket, NotificationConfiguration=notification_api(p["NotificationConfiguration"]))
        return bucket_policies


def notification_api(cfn: dict) -> dict:
    """CloudFormation's NotificationConfiguration shape -> the PutBucketNotificationConfiguration shape."""
    queues = []
    for q in cfn.get("QueueConfigurations", []):
        api = {"QueueArn": q["Queue"], "Events": [q["Event"]]}
        if "Filter" in q:
            api["Filter"] = {"Key": {"FilterRules": q["Filter"]["S3Key"]["Rules"]}}
        queues.append(api)
    return {"QueueConfigurations": queues}


def png_bytes(image) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def keys(s3, bucket: str, prefix: str = "") -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def queue_count(sqs, url: str) -> int:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def s3_notification(bucket: str, key: str) -> str:
    """A real S3 notification record (shared/events), naming another bucket and key."""
    event = json.loads((SHARED / "events" / "s3Event.json").read_text())
    record = event["Records"][0]
    record["awsRegion"] = REGION
    record["s3"]["bucket"].update(name=bucket, arn=f"arn:aws:s3:::{bucket}")
    record["s3"]["object"] = {"key": key}  # no size/eTag: nothing to fingerprint without a read
    return json.dumps(event)


def allowed(policy: dict, action: str, arn: str) -> bool:
    return any(s["Effect"] == "Allow" and action in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])
               and any(fnmatch.fnmatchcase(arn, r) for r in (s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]))
               for s in policy["Statement"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning")  # the policies moto skips: applied below
def test_stack_deploys_into_moto_and_a_worker_drains_its_queue(moto_endpoint, tmp_path):
    body = template()
    cfn, s3, sqs, iam = (client(s, moto_endpoint) for s in ("cloudformation", "s3", "sqs", "iam"))
    cfn.create_stack(StackName="superres", TemplateBody=TEMPLATE.read_text(), Capabilities=["CAPABILITY_IAM"],
                     Parameters=[{"ParameterKey": "DeployCompute", "ParameterValue": "false"},
                                 {"ParameterKey": "MaxReceiveCount", "ParameterValue": "3"}])
    stack = Stack(moto_endpoint, "superres", body)
    out = stack.outputs
    inbox, outbox, queue, dlq = out["InboxBucketName"], out["OutboxBucketName"], out["QueueUrl"], out["DeadLetterQueueUrl"]
    assert not any(stack.created(n) for n in ("Cluster", "WorkerService", "UpscaleFunction", "WorkerScalableTarget"))

    # what the stack made: encrypted buckets, the queue with its DLQ redrive, the least-privilege policy
    for bucket in (inbox, outbox):
        rule = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
        assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert json.loads(attrs["RedrivePolicy"]) == {"deadLetterTargetArn": out["DeadLetterQueueArn"], "maxReceiveCount": 3}
    assert attrs["SqsManagedSseEnabled"] == "true"
    dlq_attrs = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["MessageRetentionPeriod"])["Attributes"]
    assert int(dlq_attrs["MessageRetentionPeriod"]) > int(attrs["MessageRetentionPeriod"])
    version = iam.get_policy(PolicyArn=out["WorkerPolicyArn"])["Policy"]["DefaultVersionId"]
    policy = iam.get_policy_version(PolicyArn=out["WorkerPolicyArn"], VersionId=version)["PolicyVersion"]["Document"]
    policy = json.loads(policy) if isinstance(policy, str) else policy
    actions = {a for s in policy["Statement"] for a in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])}
    assert actions == {"s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:DeleteObject", "s3:ListBucket",
                       "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes"}
    assert not allowed(policy, "s3:PutObject", f"arn:aws:s3:::{inbox}/incoming/x.png")  # never writes the inbox
    assert not allowed(policy, "s3:GetObject", f"arn:aws:s3:::{inbox}/elsewhere/x.png")  # reads only its prefix
    assert not allowed(policy, "s3:DeleteObject", f"arn:aws:s3:::{outbox}/upscaled/x.png")  # deletes only ledger rows

    bucket_policies = stack.apply_what_moto_skips(s3)
    assert s3.get_public_access_block(Bucket=inbox)["PublicAccessBlockConfiguration"]["BlockPublicPolicy"] is True
    assert json.loads(sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["Policy"])["Attributes"]["Policy"])[
        "Statement"][0]["Condition"]["ArnEquals"] == {"aws:SourceArn": f"arn:aws:s3:::{inbox}"}
    assert set(bucket_policies) == {inbox, outbox}
    for bucket, doc in bucket_policies.items():  # TLS only: every action, on the bucket and its objects
        (deny,) = doc["Statement"]
        assert deny["Effect"] == "Deny" and deny["Principal"] == "*" and deny["Action"] == "s3:*"
        assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        assert deny["Resource"] == [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]

    # a real worker, configured as the template configures the ECS task (moto runs no containers), but on the CPU
    # with a small model, against moto, with short SQS timings
    container = body["Resources"]["WorkerTaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    command = stack.resolve(container["Command"])
    env = {e["Name"]: str(e["Value"]) for e in stack.resolve(container["Environment"])}
    assert env["SUPERRES_QUEUE_URL"] == queue and env["SUPERRES_OUTBOX"] == out["OutboxUri"]
    metrics_port = free_port()
    env.update(SUPERRES_MODEL=MODEL, SUPERRES_MODEL_DIR=str(SHARED_MODELS), SUPERRES_DEVICE="cpu",
               SUPERRES_THREADS="1", SUPERRES_LEASE_S="8", SUPERRES_METRICS_PORT=str(metrics_port))
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([*superres_cmd(), *command, "--visibility-s", "10", "--wait-s", "1"],
                              env=cli_env(**{**aws_env(moto_endpoint), **env}), stdout=open(log, "ab"),
                              stderr=subprocess.STDOUT)
    try:
        photo = cv2.imread(str(DATASETS / "BSD100" / "LR_bicubic" / "X2" / "img_001x2.png"))[:48, :64]
        s3.put_object(Bucket=inbox, Key="incoming/photo.png", Body=png_bytes(photo))
        s3.put_object(Bucket=inbox, Key="incoming/page.png", Body=b"<!DOCTYPE html><html>404 Not Found</html>\n")
        s3.put_object(Bucket=inbox, Key="elsewhere/ignored.png", Body=png_bytes(photo))  # outside the prefix
        # an event for an object whose bucket was deleted since: gone for good, set aside with a record
        sqs.send_message(QueueUrl=queue, MessageBody=s3_notification(f"{inbox}-deleted", "incoming/lost.png"))
        # an event naming a bucket S3 cannot have: the source is unreadable for good, a record, not a retry
        poison = s3_notification("no such bucket", "incoming/poison.png")
        sqs.send_message(QueueUrl=queue, MessageBody=poison)

        def settled() -> bool:
            failed = keys(s3, outbox, "failed/")
            return ("upscaled/photo.png" in keys(s3, outbox, "upscaled/") and "failed/page.png.error.json" in failed
                    and any(k.endswith("lost.png.error.json") for k in failed)
                    and any(k.endswith("poison.png.error.json") for k in failed) and queue_count(sqs, queue) == 0)

        deadline = time.monotonic() + 90
        while not settled() and time.monotonic() < deadline:
            assert worker.poll() is None, log.read_text()
            time.sleep(0.5)
        assert settled(), log.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5) as r:  # the probes' URL
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
    assert code == 0, log.read_text()

    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("reason") == "s3:TestEvent" for line in lines)  # S3's first message: skipped, deleted
    tries = [line for line in lines if line.get("message") == "item" and "no such bucket" in line.get("source", "")]
    assert [line["outcome"] for line in tries] == ["failed"]

    # the image, upscaled (x2), below the outbox prefix, its path below the inbox prefix kept
    data = s3.get_object(Bucket=outbox, Key="upscaled/photo.png")["Body"].read()
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).shape == (96, 128, 3)
    assert not any("ignored" in k for k in keys(s3, outbox))
    # the bad input: untouched, beside its reason
    record = json.loads(s3.get_object(Bucket=outbox, Key="failed/page.png.error.json")["Body"].read())
    assert record["error"] == "not_an_image"
    assert s3.get_object(Bucket=outbox, Key="failed/page.png")["Body"].read().startswith(b"<!DOCTYPE html>")
    lost = next(k for k in keys(s3, outbox, "failed/") if k.endswith("lost.png.error.json"))
    record = json.loads(s3.get_object(Bucket=outbox, Key=lost)["Body"].read())
    assert record["error"] == "vanished" and record["input_kept"] is False
    # nothing lost: every message was settled and deleted; nothing valid (or invalid) reached the DLQ
    assert queue_count(sqs, queue) == 0 and queue_count(sqs, dlq) == 0
    poisoned = next(k for k in keys(s3, outbox, "failed/") if k.endswith("poison.png.error.json"))
    assert json.loads(s3.get_object(Bucket=outbox, Key=poisoned)["Body"].read())["error"] == "unreadable"
    # everything the worker wrote is within what the worker policy allows (ledger included)
    written = keys(s3, outbox)
    assert any(k.startswith(".superres/ledger/upscaled/") for k in written)
    for key in written:
        assert allowed(policy, "s3:PutObject", f"arn:aws:s3:::{outbox}/{key}"), key
    for key in ("incoming/photo.png", "incoming/page.png"):
        assert allowed(policy, "s3:GetObject", f"arn:aws:s3:::{inbox}/{key}")


# ------------------------------------------------------------------------------------------ Kubernetes -------------

def k8s_docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


# The KEDA CRDs (keda.sh/v1alpha1), written down from KEDA's docs (ScaledObject specification, the aws-sqs-queue
# scaler, the AWS pod identity provider; KEDA 2.13+) for the fields these manifests use, with their types and the
# required ones. Trigger metadata values are strings in the CRD (map[string]string).
_INT = {"type": "integer", "minimum": 0}
_META = {"type": "object", "required": ["name"],
         "properties": {"name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
AWS_SQS_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {k: {"type": "string"} for k in (
        "queueURL", "queueURLFromEnv", "queueLength", "activationQueueLength", "scaleOnInFlight", "scaleOnDelayed",
        "awsRegion", "awsEndpoint", "identityOwner")},
    "required": ["awsRegion"],
    "anyOf": [{"required": ["queueURL"]}, {"required": ["queueURLFromEnv"]}],
    "allOf": [{"properties": {
        "queueLength": {"pattern": "^[0-9]+$"}, "activationQueueLength": {"pattern": "^[0-9]+$"},
        "scaleOnInFlight": {"enum": ["true", "false"]}, "scaleOnDelayed": {"enum": ["true", "false"]},
        "identityOwner": {"enum": ["pod", "operator"]}}}],
}
KEDA_SCHEMAS = {
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"}, "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                       "properties": {"name": {"type": "string", "minLength": 1},
                                                      "kind": {"type": "string"}, "apiVersion": {"type": "string"},
                                                      "envSourceContainerName": {"type": "string"}}},
                    "pollingInterval": _INT, "cooldownPeriod": _INT, "initialCooldownPeriod": _INT,
                    "idleReplicaCount": _INT, "minReplicaCount": _INT, "maxReplicaCount": _INT,
                    "fallback": {"type": "object", "required": ["failureThreshold", "replicas"],
                                 "properties": {"failureThreshold": _INT, "replicas": _INT,
                                                "behavior": {"type": "string"}}},
                    "advanced": {"type": "object", "additionalProperties": False, "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False, "properties": {
                            "name": {"type": "string"},
                            "behavior": {"type": "object", "additionalProperties": False, "properties": {
                                d: {"type": "object", "additionalProperties": False, "properties": {
                                    "stabilizationWindowSeconds": _INT,
                                    "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
                                    "policies": {"type": "array", "items": {
                                        "type": "object", "additionalProperties": False,
                                        "required": ["type", "value", "periodSeconds"],
                                        "properties": {"type": {"enum": ["Pods", "Percent"]}, "value": _INT,
                                                       "periodSeconds": _INT}}}}}
                                for d in ("scaleUp", "scaleDown")}}}}}},
                    "triggers": {"type": "array", "minItems": 1, "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"}, "name": {"type": "string"},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "useCachedMetrics": {"type": "boolean"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "authenticationRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                                  "properties": {"name": {"type": "string"},
                                                                 "kind": {"enum": ["TriggerAuthentication",
                                                                                   "ClusterTriggerAuthentication"]}}}},
                        "if": {"properties": {"type": {"const": "aws-sqs-queue"}}},
                        "then": {"properties": {"metadata": AWS_SQS_METADATA}}}},
                },
                # idleReplicaCount must be below minReplicaCount; maxReplicaCount at least minReplicaCount (checked below)
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "TriggerAuthentication"}, "metadata": _META,
            "spec": {"type": "object", "properties": {
                "podIdentity": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["provider"],
                    "properties": {"provider": {"enum": ["none", "aws", "aws-eks", "azure-workload", "gcp"]},
                                   "roleArn": {"type": "string"}, "identityOwner": {"enum": ["keda", "workload"]},
                                   "identityId": {"type": "string"}, "identityTenantId": {"type": "string"},
                                   "identityAuthorityHost": {"type": "string"}},
                    "not": {"required": ["roleArn", "identityOwner"]},  # mutually exclusive
                },
                "secretTargetRef": {"type": "array", "items": {"type": "object", "required": ["parameter", "name", "key"]}},
                "env": {"type": "array", "items": {"type": "object", "required": ["parameter", "name"]}},
            }},
        },
    },
}


def keda_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(KEDA_SCHEMAS[doc["kind"]])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    spec = doc.get("spec", {})
    if doc["kind"] == "ScaledObject" and not errors:
        if spec.get("maxReplicaCount", 100) < spec.get("minReplicaCount", 0):
            errors.append("maxReplicaCount < minReplicaCount")
        if "idleReplicaCount" in spec and spec["idleReplicaCount"] >= spec.get("minReplicaCount", 0):
            errors.append("idleReplicaCount must be less than minReplicaCount")
    return errors


# the oldest Kubernetes the bundled schemas cover that EKS still ran in 2025, and the newest they cover
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def test_kubernetes_manifests_pass_the_bundled_kubernetes_schemas():
    validated = set()
    for doc in k8s_docs():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)  # strict: an unknown field is an error
        validated.add(doc["kind"])
    assert {"Deployment", "ConfigMap", "ServiceAccount", "Namespace", "Service"} <= validated


def test_keda_objects_match_the_crd_schema():
    docs = k8s_docs()
    for kind in ("ScaledObject", "TriggerAuthentication"):
        assert keda_errors(one(docs, kind)) == []


def test_the_validators_catch_mistakes():
    docs = k8s_docs()
    deployment = copy.deepcopy(one(docs, "Deployment", "superres-worker"))
    deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["nmae"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    deployment = copy.deepcopy(one(docs, "Deployment", "superres-worker"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "900"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)

    scaled = one(docs, "ScaledObject")
    for change in (lambda s: s["spec"].update(maxReplicaCount="4"),
                   lambda s: s["spec"].pop("scaleTargetRef"),
                   lambda s: s["spec"]["triggers"][0]["metadata"].pop("awsRegion"),
                   lambda s: s["spec"]["triggers"][0]["metadata"].update(queueLenght="2"),
                   lambda s: s["spec"]["triggers"][0]["metadata"].update(queueLength=2),
                   lambda s: s["spec"].update(minReplicaCount=5, maxReplicaCount=2)):
        broken = copy.deepcopy(scaled)
        change(broken)
        assert keda_errors(broken), broken
    auth = copy.deepcopy(one(docs, "TriggerAuthentication"))
    auth["spec"]["podIdentity"]["roleArn"] = "arn:aws:iam::123456789012:role/x"  # with identityOwner: exclusive
    assert keda_errors(auth)


def test_kubernetes_pieces_fit_together():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    docs = k8s_docs()
    deployment, config = one(docs, "Deployment", "superres-worker"), one(docs, "ConfigMap", "superres-config")
    account, scaled, auth = one(docs, "ServiceAccount"), one(docs, "ScaledObject"), one(docs, "TriggerAuthentication")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = config["data"]

    assert container["args"] == ["worker"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert container["image"] == kustomization["images"][0]["name"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    assert "replicas" not in deployment["spec"]  # KEDA owns it
    # the probes ask the port the worker serves /healthz on
    (port,) = [p for p in container["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == int(env["SUPERRES_METRICS_PORT"]) == 9100
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # longer than the longest item (about 5 minutes on a GPU, see deployment.yaml), and than the visibility timeout
    assert pod["terminationGracePeriodSeconds"] >= 600 > int(env["SUPERRES_VISIBILITY_S"])
    liveness = container["livenessProbe"]
    assert 120 + liveness["periodSeconds"] * liveness["failureThreshold"] >= 600  # a long item is not killed

    # the ConfigMap holds settings the service knows, with values it accepts, for the GPU
    assert settings_names(env) == set()
    settings = settings_from(env)
    assert settings.device == "cuda" and settings.queue_url == env["SUPERRES_QUEUE_URL"]
    assert settings.outbox.startswith("s3://") and settings.failed_location().startswith("s3://")

    # KEDA scales this Deployment, from zero, with the queue and the identity of the worker
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 0 and scaled["spec"]["maxReplicaCount"] >= 1
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "aws-sqs-queue" and trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert trigger["metadata"]["queueURLFromEnv"] in env
    assert trigger["metadata"]["awsRegion"] == env["AWS_REGION"]
    assert auth["spec"]["podIdentity"] == {"provider": "aws", "identityOwner": "workload"}
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {kustomization["namespace"]}


def test_the_serve_deployment_and_its_service_fit_together():
    docs = k8s_docs()
    deployment, service = one(docs, "Deployment", "superres-serve"), one(docs, "Service", "superres-serve")
    config = one(docs, "ConfigMap", "superres-serve-config")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = config["data"]
    assert container["args"] == ["serve"]
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert container["image"] == yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"][0]["name"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    # the token from a Secret, never from the ConfigMap
    assert "SUPERRES_API_TOKEN" not in env
    (token,) = [e for e in container["env"] if e["name"] == "SUPERRES_API_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["key"] == "token"
    # the Service selects the pods and reaches the port serve binds, on every interface of the pod
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()
    (port,) = container["ports"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port["name"] and port["containerPort"] == int(env["SUPERRES_PORT"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    # the settings are the service's own, with values it accepts
    assert settings_names(env) == set()
    settings = settings_from(env)
    assert settings.host == "0.0.0.0" and settings.device == "cuda" and settings.outbox.startswith("s3://")
    assert pod["terminationGracePeriodSeconds"] >= 600  # the jobs in hand finish after SIGTERM
