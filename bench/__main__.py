import sys

from bench.cli import main

try:
    sys.exit(main())
except KeyboardInterrupt:
    print("bench: interrupted; every mount was undone", file=sys.stderr)
    sys.exit(130)
