"""Clip21Strategy asked for 5 clients on a simulation of 3 nodes: it waits for nodes (run by tests/test_stop.py).

The issue's case of a run that waits; a signal must end it (Ray shut down),
with RunStopped, whose exit status this script exits with.
"""

from __future__ import annotations

import sys

from flwr.serverapp import ServerApp

from clients.digits_example import clip21_app
from fl_clip21.flower.simulation import simulate_app
from fl_clip21.flower.stop import RunStopped
from server.digits_example import clip21_main


def main() -> int:
    app = ServerApp()

    @app.main()
    def _main(grid, context) -> None:
        clip21_main(grid, context, num_nodes=5)

    try:
        simulate_app(app, clip21_app, {"num-clients": 3, "num-cpus": 1.0})
    except RunStopped as e:
        print(f"RunStopped: {e}", file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
