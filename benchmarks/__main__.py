"""``python -m benchmarks [overrides]``: see benchmarks/cli.py and docs/benchmarks.md.
``python -m benchmarks advise <overrides>``: sync or async for a job (benchmarks/advise.py)."""

import sys

if sys.argv[1:2] == ["advise"]:
    from benchmarks.advise import main as advise

    advise(sys.argv[2:])
else:
    from benchmarks.cli import main

    main()
