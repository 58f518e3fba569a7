"""`python -m dist_free.bench`: see dist_free.bench.suite for the parts and options."""

import sys

from dist_free.bench.suite import main

sys.exit(main())
