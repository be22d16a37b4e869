"""dxgate's network edge and job lifecycle, one subpackage per stage of the flow.

receive -> assemble -> route -> work -> send, with store (the job store), api (HTTP) and states (every
state machine and the failure stages). `server` runs them in one process.
"""

__version__ = "0.1.0"
