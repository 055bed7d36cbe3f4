#!/usr/bin/env python3
"""Make development certificates for the demo and local testing (trustme; never for production).

python certs/make_dev_certs.py            # writes certs/demo-{ca,cert,key}.pem
"""

from pathlib import Path

from wsproxy.runtime.devcerts import make_dev_certs

if __name__ == "__main__":
    ca, cert, key = make_dev_certs(Path(__file__).resolve().parent)
    print(f"CA (trust this in clients): {ca}\ncert chain: {cert}\nkey: {key}")
