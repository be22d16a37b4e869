"""dxgate's network edge and job lifecycle: SCP, spool, assembly, routing, jobs, worker, sender, API."""

__version__ = "0.1.0"
