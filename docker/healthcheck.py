#!/usr/bin/python3
"""Container health check: exit 0 when the service's /readyz answers 200, else 1 (with the reason).

Standard library only, so it runs with the system Python. The port follows ALEXNET_PORT like the service.
"""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("ALEXNET_PORT", "8000")
url = f"http://127.0.0.1:{port}/readyz"
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except urllib.error.HTTPError as e:
    print(f"{url}: HTTP {e.code}", file=sys.stderr)
except (OSError, ValueError) as e:
    print(f"{url}: {e}", file=sys.stderr)
sys.exit(1)
