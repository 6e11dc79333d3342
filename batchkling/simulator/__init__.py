"""A local ImaRouter- and Kling-compatible provider that misbehaves on demand.

``batchkling simulate`` serves it; tests embed it.

Usage in a test::

    from batchkling.simulator import SimConfig, SimulatorServer

    with SimulatorServer(SimConfig(speed=100, slot_limit=3)) as sim:
        ...  # point a client at sim.base_url; assert on sim.stats()

or in-process with a fake clock: ``httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(
cfg, clock=fake)))``. See ``config.py`` for every knob and ``PROFILES`` for the named fault sets.
"""

from batchkling.simulator.app import create_app
from batchkling.simulator.config import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_SECRET_KEY,
    PROFILES,
    SimConfig,
    load_faults,
)
from batchkling.simulator.server import SimulatorServer, serve_forever
from batchkling.simulator.state import SimState

__all__ = [
    "DEFAULT_ACCESS_KEY",
    "DEFAULT_SECRET_KEY",
    "PROFILES",
    "SimConfig",
    "SimState",
    "SimulatorServer",
    "create_app",
    "load_faults",
    "serve_forever",
]
