"""`robustdice keys` and `robustdice inventory`: the mesh's set-up commands.

keys       make CurveZMQ key pairs and print the peers.yaml fragment that lists them
inventory  derive the Ansible inventory for deploy/site.yml, and the boards' copy of peers.yaml,
           from the controller's peers.yaml
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

from .config import load_peers
from .errors import ConfigError
from .keys import make_keypairs

# Where deploy/site.yml puts things on a board, relative to its peers.yaml (/etc/robustdice).
BOARD_PLAN_DIR = "plan"
BOARD_SECRET_KEY_FILE = "keys/{id}.key_secret"
# The client name whose key `robustdice submit` and `status` find without --key
# (client.key_secret beside the nodes' keys, node/client.py).
DEFAULT_CLIENTS = "client"


def register(subparsers) -> None:
    parser = subparsers.add_parser("keys", help="make CurveZMQ key pairs for mesh nodes",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for <id>.key and <id>.key_secret")
    parser.add_argument("--ids", required=True,
                        help="comma-separated node ids, one per device in plan order, e.g. n0,n1,n2 "
                             "(listed under peers:)")
    parser.add_argument("--clients", default=DEFAULT_CLIENTS,
                        help="comma-separated client names, listed under clients: (default %(default)s, the "
                             "key that submit and status use without --key; '' for none)")
    parser.set_defaults(func=run_keys)

    inv = subparsers.add_parser("inventory", help="derive the Ansible inventory (deploy/) from peers.yaml",
                                description="Write OUT/inventory.yaml (one host per peer) and OUT/peers.yaml "
                                            "(the boards' copy, with the deploy's paths) for deploy/site.yml.")
    inv.add_argument("--peers", required=True, type=Path, help="the controller's peers.yaml (with plan: and keys)")
    inv.add_argument("--out", required=True, type=Path, help="folder for inventory.yaml and the boards' peers.yaml")
    inv.add_argument("--user", help="ansible_user for every board")
    inv.add_argument("--local", type=Path, metavar="ROOT",
                     help="try the deploy on this machine: every host is local, under ROOT/<id>/")
    inv.set_defaults(func=run_inventory)


def _names(option: str, text: str) -> list:
    names = [i.strip() for i in text.split(",") if i.strip()]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"{option}: {dup!r} is listed twice")
    return names


def run_keys(args: argparse.Namespace) -> int:
    ids = _names("--ids", args.ids)
    clients = _names("--clients", args.clients)
    if not ids:
        raise ConfigError(f"--ids: {args.ids!r} names no node")
    both = next((i for i in ids if i in clients), None)
    if both is not None:
        # A client listed as a peer would make peers.yaml one device longer than the plan.
        raise ConfigError(f"--ids: {both!r} is also a client (--clients {args.clients}); "
                          f"--ids names the nodes only")
    publics = make_keypairs(args.out, ids + clients)
    fragment = {"secret_key_file": f"{args.out.rstrip('/')}/{{id}}.key_secret"}
    if clients:
        fragment["clients"] = [{"name": c, "public_key": publics[c]} for c in clients]
    # ports step by 2: each node also uses port + 1 as its client port
    fragment["peers"] = [{"id": i, "host": "HOST", "port": 5550 + 2 * n, "public_key": publics[i]}
                         for n, i in enumerate(ids)]
    print(yaml.safe_dump(fragment, sort_keys=False), end="")
    return 0


def run_inventory(args: argparse.Namespace) -> int:
    config = load_peers(args.peers)
    if config.plan is None:
        raise ConfigError(f"plan: {args.peers} names no plan folder, and the deploy copies the plan")
    plan_dir = config.plan.resolve()
    if not (plan_dir / "plan.json").exists():
        raise ConfigError(f"plan: no plan.json in {plan_dir}")
    args.out.mkdir(parents=True, exist_ok=True)
    board = dataclasses.replace(config, plan=Path(BOARD_PLAN_DIR),
                                secret_key_file=None if config.insecure else BOARD_SECRET_KEY_FILE)
    board_peers = args.out / "peers.yaml"
    board_peers.write_text(board.to_yaml())
    hosts = {}
    for device, peer in enumerate(config.peers):
        host = {"ansible_host": peer.host, "robustdice_node_id": peer.id, "robustdice_device": device}
        if not config.insecure:
            key = config.secret_key_path(peer.id).resolve()
            if not key.exists():
                raise ConfigError(f"secret_key_file: {key} (the key of {peer.id}) does not exist")
            host["robustdice_secret_key"] = str(key)
        if args.user:
            host["ansible_user"] = args.user
        if args.local:
            host.update(ansible_connection="local", robustdice_root=str((args.local / peer.id).resolve()))
        hosts[peer.id] = host
    inventory = {"robustdice_nodes": {
        "vars": {"robustdice_peers_file": str(board_peers.resolve()), "robustdice_plan_dir": str(plan_dir)},
        "hosts": hosts}}
    path = args.out / "inventory.yaml"
    path.write_text("# Derived from %s by `robustdice inventory`; regenerate rather than edit.\n%s"
                    % (args.peers, yaml.safe_dump(inventory, sort_keys=False)))
    print(f"wrote {path} ({len(hosts)} hosts) and {board_peers}; deploy with:\n"
          f"  ansible-playbook -i {path} deploy/site.yml")
    return 0
