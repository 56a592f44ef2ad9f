"""`robustdice keys`: make CurveZMQ key pairs and print the peers.yaml fragment that lists them."""
from __future__ import annotations

import argparse

import yaml

from .keys import make_keypairs


def register(subparsers) -> None:
    parser = subparsers.add_parser("keys", help="make CurveZMQ key pairs for mesh nodes",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for <id>.key and <id>.key_secret")
    parser.add_argument("--ids", required=True, help="comma-separated node ids, e.g. n0,n1,n2")
    parser.set_defaults(func=run_keys)


def run_keys(args: argparse.Namespace) -> int:
    ids = [i.strip() for i in args.ids.split(",") if i.strip()]
    publics = make_keypairs(args.out, ids)
    fragment = {"secret_key_file": f"{args.out.rstrip('/')}/{{id}}.key_secret",
                                # ports step by 2: each node also uses port + 1 as its client port
                "peers": [{"id": i, "host": "HOST", "port": 5550 + 2 * n, "public_key": k}
                          for n, (i, k) in enumerate(publics.items())]}
    print(yaml.safe_dump(fragment, sort_keys=False), end="")
    return 0
