"""collector: the target-side appliance for AWS VPC Traffic Mirroring."""

__version__ = "0.1.0"
