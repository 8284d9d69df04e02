#!/usr/bin/env python3
"""Source images for the rig's moto EC2 endpoint.

The rig's account (moto's 123456789012, owner `self`) gets one image per virtualization type,
named `baker-rig-source-<type>-<version>`, tagged `baker.io/rig=source`, x86_64, EBS root.
Templates find them with owner `self` and name `baker-rig-source-hvm-*`.

Why they are loaded from a file and not registered through the API: moto's RegisterImage ignores
the virtualization type, and every image made through the API (RegisterImage, CopyImage,
CreateImage) has root device type `standard`, which packer's amazon-ebs builder refuses as a
source ("invalid root device type. Expected 'ebs'"). moto loads `MOTO_AMIS_PATH` at start-up
with the attributes given, so the images are there from moto's first request and come back
whenever moto restarts. The file also keeps moto's built-in public images.

Subcommands (run with the rig's moto virtualenv python; boto3 comes with moto):
  seed_ec2.py write-amis FILE                   write the MOTO_AMIS_PATH file (idempotent)
  seed_ec2.py check --endpoint URL [--timeout S] wait for moto, then check the images are served
"""

import argparse
import json
import os
import sys
import time

VERSION = "2026.11.0"
ACCOUNT = "123456789012"  # moto's default account, which `self` means
TAGS = {"baker.io/rig": "source"}
# Fixed ids keep the file stable, so a rewrite is a no-op and ids survive a moto restart.
IMAGES = {
    "hvm": "ami-0ba4e7000000000a1",
    "paravirtual": "ami-0ba4e7000000000b2",
}


def image_name(vtype):
    return f"baker-rig-source-{vtype}-{VERSION}"


def write_amis(path):
    from moto.utilities.utils import load_resource

    amis = [a for a in load_resource("ec2/resources/amis.json") if a["ami_id"] not in IMAGES.values()]
    for vtype, ami_id in IMAGES.items():
        amis.append(
            {
                "ami_id": ami_id,
                "name": image_name(vtype),
                "description": f"Baker rig source image ({vtype})",
                "owner_id": ACCOUNT,
                "public": False,
                "state": "available",
                "architecture": "x86_64",
                "virtualization_type": vtype,
                "root_device_type": "ebs",
                "root_device_name": "/dev/xvda",
                "image_type": "machine",
                "image_location": f"{ACCOUNT}/{image_name(vtype)}",
                "hypervisor": "xen",
                "platform": None,
                "sriov": "simple",
                "creation_date": "2026-11-01T00:00:00.000Z",
                "tags": TAGS,
            }
        )
    text = json.dumps(amis, indent=1, sort_keys=True) + "\n"
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def check(endpoint, region, timeout):
    import boto3
    import botocore.config
    import botocore.exceptions

    ec2 = boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name=region,
        # moto's dummy credentials: explicit, so nothing looks for real ones or at IMDS.
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = ec2.describe_images(Owners=["self"], Filters=[{"Name": "tag:baker.io/rig", "Values": ["source"]}])
            break
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError) as e:
            if time.monotonic() > deadline:
                sys.exit(f"seed_ec2: moto did not answer at {endpoint} within {timeout:g}s: {e}")
            time.sleep(0.2)
    have = {(i["Name"], i["VirtualizationType"], i["RootDeviceType"]) for i in found["Images"]}
    want = {(image_name(v), v, "ebs") for v in IMAGES}
    if not want <= have:
        sys.exit(f"seed_ec2: moto at {endpoint} lacks source images {sorted(want - have)} (was it started with MOTO_AMIS_PATH?)")
    for i in sorted(found["Images"], key=lambda i: i["Name"]):
        print(f"seed_ec2: {i['ImageId']} {i['Name']} ({i['VirtualizationType']}, {i['RootDeviceType']})")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-amis")
    w.add_argument("file")
    c = sub.add_parser("check")
    c.add_argument("--endpoint", required=True)
    c.add_argument("--region", default="us-east-1")
    c.add_argument("--timeout", type=float, default=30)
    a = p.parse_args()
    if a.cmd == "write-amis":
        write_amis(a.file)
    else:
        check(a.endpoint, a.region, a.timeout)


if __name__ == "__main__":
    main()
