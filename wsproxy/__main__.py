"""`python -m wsproxy` is `wsproxy`."""

import sys

from wsproxy.cli import main

sys.exit(main())
