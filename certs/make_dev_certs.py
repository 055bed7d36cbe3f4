#!/usr/bin/env python3
"""Make development certificates for the demo and local testing (trustme; never for production).

python certs/make_dev_certs.py [DIR]   # writes DIR/demo-{ca,cert,key}.pem; DIR defaults to the
                                       # directory `wsproxy demo` uses (~/.cache/wsproxy/certs)
"""

import sys
from pathlib import Path

from wsproxy.runtime.devcerts import default_certs_dir, make_dev_certs

if __name__ == "__main__":
    ca, cert, key = make_dev_certs(Path(sys.argv[1]) if len(sys.argv) > 1 else default_certs_dir())
    print(f"CA (trust this in clients): {ca}\ncert chain: {cert}\nkey: {key}")
