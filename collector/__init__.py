"""collector: the target-side appliance for AWS VPC Traffic Mirroring.

`collector.connect(data)` opens the SQL views over a dataset (a directory or s3://bucket/prefix);
it is imported on first use so that `import collector` stays cheap for the appliance itself.
"""

__version__ = "0.1.0"
__all__ = ["connect"]


def __getattr__(name: str):
    if name == "connect":
        from collector.query import connect

        return connect
    raise AttributeError(f"module 'collector' has no attribute {name!r}")
