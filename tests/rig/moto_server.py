#!/usr/bin/env python3
"""moto_server, plus AMI deprecation, for the rig's fake EC2.

moto (5.2.5) has no EnableImageDeprecation or DisableImageDeprecation, and DescribeImages never
reports a DeprecationTime, so Baker's image deprecation cannot run against the rig. This adds them:
  EnableImageDeprecation (ImageId, DeprecateAt)  stores the time on the image, answers true
  DisableImageDeprecation (ImageId)              clears it, answers true
  DescribeImages                                 DeprecationTime (2027-01-01T00:00:00.000Z) on
                                                 images that have one
and, so that an image baked on the rig can be the source of the next bake (a base image, then a
service on it), as on EC2:
  CreateImage, CopyImage                         the new image's root device type is `ebs` (moto
                                                 says `standard`, which packer's amazon-ebs
                                                 builder refuses as a source)
and, so that DescribeImages does not slow down with every tag in the account:
  each resource's tags                           read from its own entry of moto's tag table
                                                 (moto 5.2.5 scans every tag of every resource
                                                 with a regex per image it describes or filters,
                                                 which made a queue of 1,000 bakes stall the rig)
An unknown image gets InvalidAMIID.NotFound (a deregistered one InvalidAMIID.Unavailable), as
moto's own EnableImage does. The time is kept as given: EC2's rounding to the minute, and
deprecated images being hidden from other accounts, are not emulated. Nothing else changes.

moto 5 serializes responses from the botocore model: a member of the Image shape is read from
the Ami object's attribute of the snake_case name (DeprecationTime -> deprecation_time), and
members that are None are left out. So the deprecation time is that attribute, None by default.

Run with the rig's moto virtualenv python, with moto_server's arguments; the process is the
server itself (no child), e.g.
  python moto_server.py -H 127.0.0.1 -p 5000
"""

import sys

from moto.core.responses import ActionResult
from moto.ec2.exceptions import InvalidAMIIdError, MissingParameterError, UnvailableAMIIdError
from moto.ec2.models.amis import Ami, AmiBackend
from moto.ec2.models.core import TaggedEC2Resource
from moto.ec2.responses.amis import AmisResponse
from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, format_timestamp, get_prefix
from moto.server import main

Ami.deprecation_time = None  # str, as DescribeImages shows it


def _image(response):
    ami_id = response._get_param("ImageId")
    backend = response.ec2_backend
    if ami_id in backend.deleted_amis:
        raise UnvailableAMIIdError(ami_id)
    if ami_id not in backend.amis:
        raise InvalidAMIIdError(ami_id)
    return backend.amis[ami_id]


def enable_image_deprecation(self):
    deprecate_at = self._get_param("DeprecateAt")  # parsed from the model: naive UTC datetime
    if deprecate_at is None:
        raise MissingParameterError("DeprecateAt")
    image = _image(self)
    self.error_on_dryrun()
    image.deprecation_time = format_timestamp(deprecate_at)
    return ActionResult({"Return": True})


def disable_image_deprecation(self):
    image = _image(self)
    self.error_on_dryrun()
    image.deprecation_time = None
    return ActionResult({"Return": True})


def _ebs_rooted(make):
    def wrapper(self, *args, **kwargs):
        image = make(self, *args, **kwargs)
        image.root_device_type = "ebs"
        return image

    return wrapper


def _own_tags(self):
    """What moto's get_tags answers (describe_tags filtered on this exact id), in the same order,
    without scanning the tags of every other resource."""
    if not self.id:
        return []
    resource_type = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "")
    return [
        {"resource_id": self.id, "key": key, "value": value, "resource_type": resource_type}
        for key, value in self.ec2_backend.tags.get(self.id, {}).items()
    ]


TaggedEC2Resource.get_tags = _own_tags
AmiBackend.create_image = _ebs_rooted(AmiBackend.create_image)
AmiBackend.copy_image = _ebs_rooted(AmiBackend.copy_image)
AmisResponse.enable_image_deprecation = enable_image_deprecation
AmisResponse.disable_image_deprecation = disable_image_deprecation

if __name__ == "__main__":
    sys.exit(main())
