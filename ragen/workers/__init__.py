"""Worker backends behind one protocol (see ``protocol.py`` and ``docs/design.md``)."""
from ragen.workers.local import LocalWorkers
from ragen.workers.protocol import Workers

__all__ = ["Workers", "LocalWorkers"]
