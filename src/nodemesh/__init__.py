"""nodemesh: a service mesh for VMs and bare-metal hosts."""

__version__ = "0.1.0"
