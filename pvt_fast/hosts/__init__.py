"""Speed up the PVT-family models people already have, in place: :func:`accelerate`."""
from pvt_fast.hosts.walk import AccelerationSummary, accelerate

__all__ = ["AccelerationSummary", "accelerate"]
