"""disttrain's benchmarks: ``python -m benchmarks`` (scaling, overhead, collectives, batch size)."""
