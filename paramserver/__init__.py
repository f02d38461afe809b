"""paramserver: a sharded parameter server for PyTorch, built for flaky edge workers.

Roles live one to a module: `coordinator` (membership, clocks, shard map),
`shard` (a partition of the parameters and its optimizer), `protocol` (the wire
contract), `consistency` (bsp/asp/ssp), `sharding` (who holds which bytes),
`tasks` (model + data + loss). The worker side is the `workers` package.
"""

__version__ = "0.1.0"
